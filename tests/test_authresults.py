"""Building our Authentication-Results header and removing forged ones."""

from __future__ import annotations

from typing import Any

import authres
import authres.arc
import authres.dkim_b
import authres.dmarc
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.auth.arc import ArcResult
from smtpproxy.auth.authresults import (
    authserv_id_of,
    build_authentication_results,
    comment,
    parse_authentication_results,
    pvalue,
    remove_forged,
)
from smtpproxy.auth.dkim import DkimSignatureResult
from smtpproxy.auth.dmarc import DmarcResult
from smtpproxy.auth.spf import SpfResult
from smtpproxy.headers import format_field

ID = "mx.example.net"
SPF = SpfResult("pass", "example.org", "mailfrom", "alice@example.org", "")
GOOD = DkimSignatureResult("pass", "example.org", "sel", "rsa-sha256", "AbCdEfGh", "@example.org", "")
BAD = DkimSignatureResult(
    "fail", "other.example", "s2", "ed25519-sha256", "12345678", "@other.example", "body hash"
)
DMARC = DmarcResult(
    "pass", "reject", "none", "example.org", "example.org", True, True, "aligned spf and dkim"
)
ARC = ArcResult("pass", 2, ("forwarder.example", "list.example"), "", 1)


def test_full_header_parses_back_with_authres() -> None:
    value = build_authentication_results(ID, SPF, [GOOD, BAD], DMARC, ARC, remote_ip="192.0.2.7")
    parsed = parse_authentication_results(value)
    assert parsed.authserv_id == ID
    methods = [(r.method, r.result) for r in parsed.results]
    assert methods == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("dkim", "fail"),
        ("arc", "pass"),
        ("dmarc", "pass"),
    ]
    spf, dkim1, dkim2, arc, dmarc = parsed.results
    assert spf.smtp_mailfrom == "alice@example.org"
    assert (dkim1.header_d, dkim1.header_b) == ("example.org", "AbCdEfGh")
    props = {(p.type, p.name): p.value for p in dkim2.properties}
    assert props == {
        ("header", "d"): "other.example",
        ("header", "s"): "s2",
        ("header", "b"): "12345678",
        ("header", "a"): "ed25519-sha256",
    }
    assert (arc.header_oldest_pass, arc.smtp_remote_ip) == ("1", "192.0.2.7")
    assert (dmarc.header_from, dmarc.policy) == ("example.org", "reject")


def test_folded_form_parses_back_and_has_one_result_per_line() -> None:
    value = build_authentication_results(ID, SPF, [GOOD], DMARC, None, linesep="\r\n")
    lines = value.split("\r\n")
    assert lines[0] == ID + ";"
    assert all(line.startswith("\t") for line in lines[1:])
    assert [r.method for r in parse_authentication_results(value).results] == ["spf", "dkim", "dmarc"]


def test_format_field_of_the_lead_folds_it_and_it_still_parses() -> None:
    value = build_authentication_results(ID, SPF, [GOOD, BAD], DMARC, ARC, remote_ip="2001:db8::1")
    raw = format_field("Authentication-Results", value).decode()
    assert all(len(line) <= 78 for line in raw.split("\r\n"))
    parsed = parse_authentication_results(raw.partition(":")[2].strip())
    assert len(parsed.results) == 5


def test_unsigned_message_says_dkim_none_and_disabled_methods_are_left_out() -> None:
    value = build_authentication_results(ID, None, [], None, None)
    assert value == f"{ID}; dkim=none"
    assert build_authentication_results(ID, None, None, None, None) == f"{ID}; none"


def test_helo_identity_uses_smtp_helo() -> None:
    spf = SpfResult("none", "mail.example.org", "helo", "postmaster@mail.example.org", "")
    parsed = parse_authentication_results(build_authentication_results(ID, spf, None, None, None))
    assert parsed.results[0].smtp_helo == "mail.example.org"


def test_dmarc_without_record_has_no_policy_property() -> None:
    dmarc = DmarcResult("none", "", "none", "example.org", "example.org", False, False, "no DMARC record")
    value = build_authentication_results(ID, None, None, dmarc, None)
    assert value == f"{ID}; dmarc=none (no DMARC record) header.from=example.org"


@pytest.mark.parametrize(
    "evil",
    [
        "a\r\nX-Injected: yes",
        'a"; spf=pass',
        "a (comment) b",
        "a\\",
        "\x00\x1b[31m",
        "a;b=c",
        "é@exämple.org",
    ],
)
def test_values_from_the_message_are_sanitised(evil: str) -> None:
    sig = DkimSignatureResult("fail", evil, evil, evil, evil, evil, evil)
    spf = SpfResult("pass", evil, "mailfrom", evil, evil)
    dmarc = DmarcResult("fail", "none", "none", evil, evil, False, False, evil)
    arc = ArcResult("fail", 1, (evil,), evil)
    value = build_authentication_results(ID, spf, [sig], dmarc, arc, remote_ip=evil)
    assert all(32 <= ord(c) < 127 for c in value)
    parsed = parse_authentication_results(value)
    assert [r.method for r in parsed.results] == ["spf", "dkim", "arc", "dmarc"]


def test_odd_result_word_becomes_permerror() -> None:
    sig = DkimSignatureResult("pass; spf=pass", "example.org", "s", "rsa-sha256", "x", "@example.org", "")
    parsed = parse_authentication_results(build_authentication_results(ID, None, [sig], None, None))
    assert parsed.results[0].result == "permerror"


# The text we write equals what the authres library renders --------------------------

_FEATURES = authres.FeatureContext(authres.dkim_b, authres.dmarc, authres.arc)


def _ref_result(method: str, result: str, note: str, props: list[tuple[str, str, str]]) -> Any:
    """How the header was built with authres objects before we wrote it ourselves."""
    word = result.strip().lower()
    word = (
        word if word.isascii() and word.isalpha() and 1 <= len(word) <= 20 and word.islower() else "permerror"
    )
    return _FEATURES.result(
        method,
        result=word,
        result_comment=comment(note) or None,
        properties=[authres.AuthenticationResultProperty(t, n, pvalue(v)) for t, n, v in props if pvalue(v)],
    )


def authres_reference(
    spf: SpfResult, sigs: list[DkimSignatureResult], dmarc: DmarcResult, arc: ArcResult, ip: str
) -> str:
    if spf.identity == "helo":
        results = [_ref_result("spf", spf.result, "", [("smtp", "helo", spf.domain)])]
    else:
        results = [_ref_result("spf", spf.result, "", [("smtp", "mailfrom", spf.sender or spf.domain)])]
    for sig in sigs:
        props = [("header", "d", sig.domain), ("header", "s", sig.selector)]
        props += [("header", "b", sig.b_prefix), ("header", "a", sig.algorithm)]
        results.append(_ref_result("dkim", sig.result, "" if sig.result == "pass" else sig.reason, props))
    if not sigs:
        results.append(_ref_result("dkim", "none", "", []))
    arc_props = []
    if arc.result == "pass" and arc.oldest_pass:
        arc_props.append(("header", "oldest-pass", str(arc.oldest_pass)))
    if arc.instances:
        arc_props.append(("smtp", "remote-ip", ip))
    note = f"i={arc.instances}" + (f" {arc.reason}" if arc.reason else "") if arc.instances else ""
    results.append(_ref_result("arc", arc.result, note, arc_props))
    dnote = f"p={dmarc.policy} dis={dmarc.disposition}" if dmarc.policy else dmarc.reason
    dprops = [("header", "from", dmarc.from_domain)] + (
        [("policy", "dmarc", dmarc.policy)] if dmarc.policy else []
    )
    results.append(_ref_result("dmarc", dmarc.result, dnote, dprops))
    return "; ".join([pvalue(ID), *(str(r) for r in results)])


# Values as they come: domains, base64 b= prefixes, IPv6 addresses, odd bytes.
_TEXT = st.text(st.sampled_from('aZ09.-@:/+=_?;"\\() \t\r\né\x00~{}'), max_size=12)
_WORDS = st.one_of(st.sampled_from(["pass", "fail", "none", "temperror", "PASS", " policy "]), _TEXT)


@settings(max_examples=400, deadline=None)
@given(
    words=st.lists(_WORDS, min_size=4, max_size=4),
    texts=st.lists(_TEXT, min_size=12, max_size=12),
    helo=st.booleans(),
    nsigs=st.integers(0, 2),
    oldest=st.integers(0, 3),
    instances=st.integers(0, 3),
)
def test_written_header_equals_authres_rendering(
    words: list[str], texts: list[str], helo: bool, nsigs: int, oldest: int, instances: int
) -> None:
    spf = SpfResult(words[0], texts[0], "helo" if helo else "mailfrom", texts[1], "")
    sig = DkimSignatureResult(words[1], texts[2], texts[3], texts[4], texts[5], texts[6], texts[7])
    dmarc = DmarcResult(words[2], texts[8][:6], "none", texts[9], "", False, False, texts[10])
    arc = ArcResult(words[3], instances, (), texts[11], oldest)
    sigs = [sig] * nsigs
    ours = build_authentication_results(ID, spf, sigs, dmarc, arc, remote_ip=texts[1])
    assert ours == authres_reference(spf, sigs, dmarc, arc, texts[1])


def test_quoting_of_values_that_are_not_tokens() -> None:
    sig = DkimSignatureResult("pass", "example.org", "sel", "rsa-sha256", "ab/c+d=", "@example.org", "")
    arc = ArcResult("pass", 1, ("example.org",), "", 1)
    value = build_authentication_results(ID, None, [sig], None, arc, remote_ip="2001:db8::1")
    assert 'header.b="ab/c+d="' in value
    assert 'smtp.remote-ip="2001:db8::1"' in value
    assert "header.d=example.org " in value


# remove_forged ---------------------------------------------------------------------

BODY = b"\r\nBody line\r\nAuthentication-Results: mx.example.net; spf=pass\r\n"


def msg(*fields: bytes) -> bytes:
    return b"".join(fields) + b"From: a@example.org\r\nSubject: hi\r\n" + BODY


def test_forged_header_with_our_id_is_removed_others_kept() -> None:
    forged = b"Authentication-Results: mx.example.net; spf=pass smtp.mailfrom=bank.example\r\n"
    other = b"Authentication-Results: relay.example; dkim=pass header.d=example.org\r\n"
    assert remove_forged(msg(forged, other), ID) == msg(other)


def test_folded_forged_header_is_removed_entirely() -> None:
    forged = b"Authentication-Results:\r\n  MX.Example.NET;\r\n\tdkim=pass\r\n header.d=bank.example\r\n"
    assert remove_forged(msg(b"Received: x\r\n", forged, b"X-Other: y\r\n"), ID) == msg(
        b"Received: x\r\n", b"X-Other: y\r\n"
    )


@pytest.mark.parametrize(
    "value",
    [
        b" (a comment (nested)) mx.example.net; none",
        b' "mx.example.net"; spf=pass',
        b" mx.example.net. 1; spf=pass",
        b" mx.example.net",
        b" mx.example.net ((( unparseable",
        b"\tmx.example.net;spf=pass",
    ],
)
def test_our_id_is_found_through_comments_quotes_and_garbage(value: bytes) -> None:
    field = b"Authentication-Results:" + value + b"\r\n"
    assert remove_forged(msg(field), ID) == msg()


@pytest.mark.parametrize(
    "field",
    [
        b"Authentication-Results: mx.example.net.evil.example; spf=pass\r\n",
        b"Authentication-Results: mx.example.netx; spf=pass\r\n",
        b"Authentication-Results: (mx.example.net) other.example; spf=pass\r\n",
        b"ARC-Authentication-Results: i=1; mx.example.net; spf=pass\r\n",
        b"X-Authentication-Results: mx.example.net; spf=pass\r\n",
    ],
)
def test_fields_not_claiming_our_id_are_kept(field: bytes) -> None:
    assert remove_forged(msg(field), ID) == msg(field)


def test_name_with_space_before_colon_and_lower_case_is_removed() -> None:
    assert remove_forged(msg(b"authentication-results : mx.example.net; none\r\n"), ID) == msg()


def test_message_stays_byte_identical_with_bare_lf_and_8bit() -> None:
    raw = (
        b"Subject: caf\xc3\xa9\n\tfolded\nAuthentication-Results: mx.example.net; none\n"
        b"X-A: b\n\n\xff\xfe body\nAuthentication-Results: mx.example.net; none\n"
    )
    expected = (
        b"Subject: caf\xc3\xa9\n\tfolded\nX-A: b\n\n"
        b"\xff\xfe body\nAuthentication-Results: mx.example.net; none\n"
    )
    assert remove_forged(raw, ID) == expected


def test_last_header_field_without_body() -> None:
    assert remove_forged(b"X-A: b\r\nAuthentication-Results: mx.example.net; none", ID) == b"X-A: b\r\n"


def test_header_block_ends_at_first_line_that_is_no_field() -> None:
    raw = b"X-A: b\r\nnot a field\r\nAuthentication-Results: mx.example.net; none\r\n"
    assert remove_forged(raw, ID) == raw


def test_nothing_to_remove_returns_same_bytes() -> None:
    raw = msg(b"Authentication-Results: other.example; none\r\n")
    assert remove_forged(raw, ID) is raw


def test_authserv_id_of_handles_empty_and_escapes() -> None:
    assert authserv_id_of(b"") == ""
    assert authserv_id_of(b" (\\) still comment) id.example; x") == "id.example"
    assert authserv_id_of(b" (unterminated comment") == ""
