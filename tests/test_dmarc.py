"""DMARC: record parsing, alignment, policy choice, and evaluation against a real DNS server."""

from __future__ import annotations

import email.utils
import re
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from publicsuffixlist import PublicSuffixList

from smtpproxy.auth.authresults import parse_authentication_results
from smtpproxy.auth.dkim import DkimSignatureResult
from smtpproxy.auth.dmarc import (
    _SIMPLE_MAILBOX,
    DmarcEvaluator,
    DmarcRecord,
    DmarcRecordError,
    DmarcResult,
    aligned,
    from_domains,
    normalize_domain,
    org_domain,
    parse_dmarc_record,
)
from smtpproxy.auth.spf import SpfResult
from smtpproxy.dns import Resolver
from tests.backends import RecordingBackend
from tests.dnsserver import DnsServer
from tests.smtpclient import RawClient, make_message


@pytest.fixture(scope="module")
def psl() -> PublicSuffixList:
    return PublicSuffixList()


# Pure parts ------------------------------------------------------------------------


def test_record_defaults() -> None:
    assert parse_dmarc_record("v=DMARC1; p=reject") == DmarcRecord(p="reject")


def test_record_all_tags_parsed() -> None:
    r = parse_dmarc_record(
        "v=DMARC1;p=Quarantine; sp=none ; np=reject; pct=25; adkim=s; aspf=S;"
        " rua=mailto:a@example.org, mailto:b@example.net; ruf=mailto:f@example.org; fo=1"
    )
    assert r == DmarcRecord(
        p="quarantine",
        sp="none",
        np="reject",
        pct=25,
        adkim="s",
        aspf="s",
        rua=("mailto:a@example.org", "mailto:b@example.net"),
        ruf=("mailto:f@example.org",),
        fo="1",
    )


@pytest.mark.parametrize("bad", ["pct=101", "pct=-1", "pct=ten", "adkim=x", "aspf=", "np=?"])
def test_invalid_optional_tags_fall_back_to_defaults(bad: str) -> None:
    assert parse_dmarc_record(f"v=DMARC1; p=reject; {bad}") == DmarcRecord(p="reject")


@pytest.mark.parametrize(
    "text",
    [
        "p=reject",
        "v=DMARC2; p=reject",
        "v=spf1 -all",
        "",
        "v=DMARC1; p=drop",
        # RFC 7489 §6.6.3 step 6: an invalid sp= spoils the record like an invalid p=.
        "v=DMARC1; p=reject; sp=drop",
        "v=DMARC1; p=reject; sp=",
        # ... unless rua= holds a syntactically valid URI; these do not.
        "v=DMARC1; p=bogus; rua=r@example.org",
        "v=DMARC1; p=bogus; rua=mailto:nobody",
        "v=DMARC1; p=bogus; rua=mailto:a b@example.org",
    ],
)
def test_not_a_usable_record(text: str) -> None:
    with pytest.raises(DmarcRecordError):
        parse_dmarc_record(text)


def test_invalid_p_with_rua_counts_as_p_none() -> None:
    assert parse_dmarc_record("v=DMARC1; rua=mailto:d@example.org").p == "none"
    assert parse_dmarc_record("v=DMARC1; p=bogus; rua=mailto:d@example.org").p == "none"


def test_invalid_sp_with_rua_counts_as_a_bare_p_none_record() -> None:
    # §6.6.3 step 6.1: "as if a record containing a valid v tag and p=none was retrieved".
    r = parse_dmarc_record("v=DMARC1; p=reject; sp=bogus; np=reject; rua=mailto:r@example.org!10m")
    assert (r.p, r.sp, r.np, r.rua) == ("none", None, None, ("mailto:r@example.org!10m",))
    assert r.as_p_none == "invalid sp=bogus, treated as p=none"
    assert parse_dmarc_record("v=DMARC1; p=reject; sp=none").as_p_none == ""
    one_good = parse_dmarc_record("v=DMARC1; p=x; rua=bogus, https://dmarc.example.org/r")
    assert one_good.p == "none"


def test_policy_for_subdomains_and_nonexistent_names() -> None:
    r = DmarcRecord(p="reject", sp="quarantine", np="none")
    assert r.policy_for(subdomain=False, nonexistent=False) == "reject"
    assert r.policy_for(subdomain=True, nonexistent=False) == "quarantine"
    assert r.policy_for(subdomain=True, nonexistent=True) == "none"
    assert DmarcRecord(p="reject").policy_for(subdomain=True, nonexistent=True) == "reject"
    assert DmarcRecord(p="reject", sp="none").policy_for(subdomain=True, nonexistent=True) == "none"


def test_org_domain_uses_public_suffix_list(psl: PublicSuffixList) -> None:
    assert org_domain("mail.example.co.uk", psl) == "example.co.uk"
    assert org_domain("a.b.example.org", psl) == "example.org"
    assert org_domain("co.uk", psl) == "co.uk"


@pytest.mark.parametrize(
    ("domain", "from_domain", "mode", "expected"),
    [
        ("example.org", "example.org", "s", True),
        ("mail.example.org", "example.org", "s", False),
        ("mail.example.org", "example.org", "r", True),
        ("example.org", "news.example.org", "r", True),
        ("Example.ORG.", "example.org", "s", True),
        ("example.net", "example.org", "r", False),
        ("a.example.co.uk", "b.example.co.uk", "r", True),
        ("evil.co.uk", "example.co.uk", "r", False),
    ],
)
def test_alignment(domain: str, from_domain: str, mode: str, expected: bool, psl: PublicSuffixList) -> None:
    assert aligned(domain, from_domain, mode, psl) is expected


def test_from_domains() -> None:
    assert from_domains([]) is None
    assert from_domains(["undisclosed-recipients:;"]) == []
    assert from_domains(['"Bank" <alice@Example.ORG>', "bob@example.org, carol@example.net"]) == [
        "example.org",
        "example.net",
    ]
    assert from_domains(["y@-bad-.org", "z@localhost", "w@[192.0.2.1]"]) == []


def _domains_via_email_package(values: list[str]) -> list[str]:
    """from_domains as it was before its fast path: everything through getaddresses."""
    out: list[str] = []
    for _name, addr in email.utils.getaddresses(values):
        if "@" in addr:
            d = normalize_domain(addr.rpartition("@")[2])
            if d and d not in out:
                out.append(d)
    return out


_FROM_PARTS = st.sampled_from(
    [
        *("alice", "Alice", "J.", "Smith,", "@", "<", ">", '"', "\\", "(c)", ".", " ", "\t", ":", ";"),
        *("[", "]", "sender.example", "a..b", "-x-", "=?utf-8?q?J=C3=B6rg?=", "é", "x.org", "bob+tag", "'"),
    ]
)


_PART = st.lists(_FROM_PARTS, max_size=4).map("".join)
# Mostly shaped like "name <local@domain>", so that the fast path's edges are hit.
_MAILBOX = st.tuples(_PART, _PART, _PART).map(lambda t: f"{t[0]} <{t[1]}@{t[2]}>") | st.lists(
    _FROM_PARTS, max_size=10
).map("".join)


@settings(max_examples=1500, deadline=None)
@given(st.lists(_MAILBOX, min_size=1, max_size=2))
@example(["Alice <alice@sender.example>"])
@example(['"Smith, J" <j@x.org>'])
@example(["Smith, J <j@x.org>"])
@example(["<a@b.example>", "c@d.example"])
@example(["a.b@x.org"])
@example(["a@evil.example <b@good.example>"])
@example(['"a@evil.example" <b@good.example>'])
@example(["a <b <c@d.example>"])
@example(["alice@x.org (comment) <bob@y.org>"])
@example(['"a\\" <a@b.org>'])
def test_from_domains_fast_path_agrees_with_the_email_package(values: list[str]) -> None:
    assert from_domains(values) == _domains_via_email_package(values)


@pytest.mark.parametrize(
    "value",
    ["Alice <alice@sender.example>", "alice@sender.example", '"Smith, J" <j@sender.example>', " <a@b.c> "],
)
def test_plain_mailboxes_take_the_fast_path(value: str) -> None:
    assert _SIMPLE_MAILBOX.match(value)


# Evaluation against DNS ------------------------------------------------------------

ZONE: dict[str, list[tuple[str, object]] | str] = {
    "_dmarc.example.org": [("TXT", "v=DMARC1; p=reject; rua=mailto:d@example.org")],
    "example.org": [("A", "192.0.2.1")],
    "mail.example.org": [("A", "192.0.2.1")],
    "_dmarc.quarantine.example": [("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.half.example": [("TXT", "v=DMARC1; p=reject; pct=50")],
    "_dmarc.none.example": [("TXT", "v=DMARC1; p=none")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject; adkim=s; aspf=s")],
    "_dmarc.sub.example": [("TXT", "v=DMARC1; p=reject; sp=quarantine; np=none")],
    "real.sub.example": [("A", "192.0.2.2")],
    "_dmarc.two.example": [("TXT", "v=DMARC1; p=reject"), ("TXT", "v=DMARC1; p=none")],
    "_dmarc.mixed.example": [("TXT", "v=spf1 -all"), ("TXT", "v=DMARC1; p=quarantine")],
    "_dmarc.slow.example": "TIMEOUT",
    "_dmarc.broken.example": "SERVFAIL",
    "_dmarc.bogus.example": [("TXT", "v=DMARC1; p=bogus")],
    "_dmarc.example.co.uk": [("TXT", "v=DMARC1; p=reject")],
}


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(dict(ZONE)) as srv:
        yield srv


@pytest.fixture
def evaluator(resolver: Resolver, psl: PublicSuffixList) -> DmarcEvaluator:
    return DmarcEvaluator(resolver, psl, random=lambda: 0.99)


def spf(result: str, domain: str) -> SpfResult:
    return SpfResult(result, domain, "mailfrom", f"bounce@{domain}", "")


def dkim(result: str, domain: str) -> DkimSignatureResult:
    return DkimSignatureResult(result, domain, "sel", "rsa-sha256", "abcdefgh", f"@{domain}", "")


async def test_dkim_aligned_pass(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(
        ["alice@example.org"], spf("fail", "evil.example"), [dkim("pass", "example.org")]
    )
    assert (r.result, r.policy, r.disposition, r.dkim_aligned, r.spf_aligned) == (
        "pass",
        "reject",
        "none",
        True,
        False,
    )
    assert r.record is not None and r.record.rua == ("mailto:d@example.org",)


async def test_spf_relaxed_aligned_pass(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["alice@example.org"], spf("pass", "bounces.example.org"), [])
    assert (r.result, r.spf_aligned, r.dkim_aligned) == ("pass", True, False)


async def test_unaligned_passes_fail_with_reject(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(
        ["Bank <alice@example.org>"], spf("pass", "evil.example"), [dkim("pass", "evil.example")]
    )
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", "reject")
    assert (r.from_domain, r.org_domain) == ("example.org", "example.org")


async def test_aligned_but_failing_dkim_does_not_count(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(
        ["a@example.org"], None, [dkim("fail", "example.org"), dkim("policy", "example.org")]
    )
    assert r.result == "fail"


async def test_strict_alignment_rejects_subdomain_identifiers(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(
        ["a@strict.example"], spf("pass", "mail.strict.example"), [dkim("pass", "mail.strict.example")]
    )
    assert (r.result, r.spf_aligned, r.dkim_aligned) == ("fail", False, False)
    ok = await evaluator.evaluate(["a@strict.example"], None, [dkim("pass", "strict.example")])
    assert ok.result == "pass"


async def test_quarantine_policy(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@quarantine.example"], None, [])
    assert (r.result, r.policy, r.disposition) == ("fail", "quarantine", "quarantine")


async def test_pct_sampling_is_injected(resolver: Resolver, psl: PublicSuffixList) -> None:
    sampled = await DmarcEvaluator(resolver, psl, random=lambda: 0.1).evaluate(["a@half.example"], None, [])
    assert (sampled.policy, sampled.disposition) == ("reject", "reject")
    spared = await DmarcEvaluator(resolver, psl, random=lambda: 0.7).evaluate(["a@half.example"], None, [])
    assert (spared.policy, spared.disposition) == ("reject", "quarantine")


async def test_p_none_fails_with_disposition_none(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@none.example"], None, [])
    assert (r.result, r.policy, r.disposition) == ("fail", "none", "none")


async def test_subdomain_falls_back_to_org_record_and_uses_sp(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@real.sub.example"], None, [])
    assert (r.result, r.policy, r.org_domain) == ("fail", "quarantine", "sub.example")


async def test_nonexistent_subdomain_uses_np(evaluator: DmarcEvaluator, dns: DnsServer) -> None:
    r = await evaluator.evaluate(["a@ghost.sub.example"], None, [])
    assert (r.result, r.policy, r.disposition) == ("fail", "none", "none")
    assert dns.count("ghost.sub.example", "A") == 1


async def test_org_domain_itself_uses_p(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@sub.example"], None, [])
    assert r.policy == "reject"


async def test_subdomain_under_two_label_suffix(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@mail.example.co.uk"], None, [dkim("pass", "example.co.uk")])
    assert (r.result, r.org_domain, r.policy) == ("pass", "example.co.uk", "reject")


async def test_no_record_is_none(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@nodmarc.example"], spf("pass", "nodmarc.example"), [])
    assert (r.result, r.policy, r.disposition, r.reason) == ("none", "", "none", "no DMARC record")


async def test_two_records_mean_no_dmarc_processing(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@two.example"], None, [])
    assert (r.result, r.disposition) == ("none", "none")
    assert "2 DMARC records" in r.reason


async def test_other_txt_records_are_ignored(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@mixed.example"], None, [])
    assert (r.result, r.policy) == ("fail", "quarantine")


async def test_unusable_record_is_no_record(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@bogus.example"], None, [])
    assert r.result == "none"


@pytest.mark.parametrize("domain", ["slow.example", "broken.example", "x.slow.example"])
async def test_dns_failure_is_temperror(evaluator: DmarcEvaluator, domain: str) -> None:
    r = await evaluator.evaluate([f"a@{domain}"], None, [])
    assert (r.result, r.disposition) == ("temperror", "none")


async def test_no_from_field_is_permerror(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate([], spf("pass", "example.org"), [])
    assert (r.result, r.disposition, r.reason) == ("permerror", "none", "no From header field")


async def test_from_without_domain_is_permerror(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["undisclosed-recipients:;"], None, [])
    assert (r.result, r.reason) == ("permerror", "no usable domain in From")


async def test_two_from_fields_same_domain_evaluated_once(evaluator: DmarcEvaluator, dns: DnsServer) -> None:
    r = await evaluator.evaluate(["a@example.org", "b@EXAMPLE.org"], None, [dkim("pass", "example.org")])
    assert r.result == "pass"
    assert dns.count("_dmarc.example.org", "TXT") == 1


async def test_several_author_domains_strictest_wins(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate(["a@none.example, b@example.org"], None, [dkim("pass", "none.example")])
    assert (r.result, r.from_domain, r.disposition) == ("fail", "example.org", "reject")
    both_pass = await evaluator.evaluate(
        ["a@none.example", "b@example.org"], None, [dkim("pass", "none.example"), dkim("pass", "example.org")]
    )
    assert both_pass.result == "pass"


async def test_too_many_author_domains_is_rejectable_permerror(evaluator: DmarcEvaluator) -> None:
    r = await evaluator.evaluate([", ".join(f"a@d{i}.example" for i in range(6))], None, [])
    assert (r.result, r.disposition) == ("permerror", "reject")


# RFC 7489 §6.6.3 step 6 and RFC 9091, each against its own zone ----------------------

STEP6_RECORDS = {
    "sp": "v=DMARC1; p=reject; sp=bogus",
    "p": "v=DMARC1; p=bogus",
}
RUA = "; rua=mailto:r@example.com"


async def evaluate_in(
    zone: dict[str, list[tuple[str, object]] | str], from_: str, psl: PublicSuffixList
) -> tuple[DmarcResult, DnsServer]:
    """DMARC for ``from_`` with SPF failing and no DKIM, against a DNS server serving ``zone``."""
    with DnsServer(zone) as srv:
        resolver = Resolver([srv.address], timeout=3.0)
        try:
            evaluator = DmarcEvaluator(resolver, psl, random=lambda: 0.99)
            result = await evaluator.evaluate([from_], spf("fail", "example.com"), [])
        finally:
            await resolver.close()
    return result, srv


@pytest.mark.parametrize("tag", sorted(STEP6_RECORDS))
@pytest.mark.parametrize("from_", ["a@sub.example.com", "a@example.com"])
async def test_invalid_policy_without_rua_means_dmarc_not_applied(
    tag: str, from_: str, psl: PublicSuffixList
) -> None:
    zone: dict[str, list[tuple[str, object]] | str] = {"_dmarc.example.com": [("TXT", STEP6_RECORDS[tag])]}
    r, _ = await evaluate_in(zone, from_, psl)
    assert (r.result, r.policy, r.disposition) == ("none", "", "none")
    assert f"invalid {tag}=bogus" in r.reason and r.reason.endswith("not applied")


@pytest.mark.parametrize("tag", sorted(STEP6_RECORDS))
@pytest.mark.parametrize("from_", ["a@sub.example.com", "a@example.com"])
async def test_invalid_policy_with_valid_rua_is_p_none(tag: str, from_: str, psl: PublicSuffixList) -> None:
    zone: dict[str, list[tuple[str, object]] | str] = {
        "_dmarc.example.com": [("TXT", STEP6_RECORDS[tag] + RUA)],
        "sub.example.com": [("A", "192.0.2.7")],
    }
    r, _ = await evaluate_in(zone, from_, psl)
    assert (r.result, r.policy, r.disposition) == ("fail", "none", "none")
    assert r.reason.endswith(f"invalid {tag}=bogus, treated as p=none")


async def test_invalid_record_at_from_domain_ends_discovery(psl: PublicSuffixList) -> None:
    zone: dict[str, list[tuple[str, object]] | str] = {
        "_dmarc.sub.example.com": [("TXT", "v=DMARC1; p=bogus")],
        "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
    }
    r, srv = await evaluate_in(zone, "a@sub.example.com", psl)
    assert (r.result, r.policy, r.disposition) == ("none", "", "none")
    assert "_dmarc.sub.example.com" in r.reason
    assert srv.count("_dmarc.example.com") == 0  # §6.6.3 step 3: no org-domain lookup


async def test_invalid_record_at_from_domain_with_rua_is_p_none_not_org_reject(psl: PublicSuffixList) -> None:
    zone: dict[str, list[tuple[str, object]] | str] = {
        "_dmarc.sub.example.com": [("TXT", "v=DMARC1; p=bogus" + RUA)],
        "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
    }
    r, srv = await evaluate_in(zone, "a@sub.example.com", psl)
    assert (r.result, r.policy, r.disposition, r.org_domain) == ("fail", "none", "none", "example.com")
    assert srv.count("_dmarc.example.com") == 0


async def test_non_dmarc_txt_at_from_domain_still_falls_back_to_org(psl: PublicSuffixList) -> None:
    zone: dict[str, list[tuple[str, object]] | str] = {
        "_dmarc.sub.example.com": [("TXT", "v=spf1 -all")],
        "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject")],
        "sub.example.com": [("A", "192.0.2.7")],
    }
    r, _ = await evaluate_in(zone, "a@sub.example.com", psl)
    assert (r.result, r.policy, r.disposition) == ("fail", "reject", "reject")


NP_ZONE: dict[str, list[tuple[str, object]] | str] = {
    "_dmarc.example.com": [("TXT", "v=DMARC1; p=none; sp=quarantine; np=reject")],
    "a-only.example.com": [("A", "192.0.2.1")],
    "aaaa-only.example.com": [("AAAA", "2001:db8::1")],
    "mx-only.example.com": [("MX", "10 mx.example.net")],
    "txt-only.example.com": [("TXT", "hello")],  # NODATA for A, AAAA and MX
    "x.parent.example.com": [("A", "192.0.2.2")],  # parent.example.com: empty non-terminal
    "slow-aaaa.example.com": [("TXT", "x"), ("TIMEOUT", "")],
}


@pytest.mark.parametrize(
    ("domain", "policy"),
    [
        ("ghost.example.com", "reject"),  # NXDOMAIN (RFC 9091 §2.1)
        ("txt-only.example.com", "reject"),  # NODATA for each of A, AAAA, MX
        ("parent.example.com", "reject"),  # an empty non-terminal: NODATA for all three
        ("a-only.example.com", "quarantine"),
        ("aaaa-only.example.com", "quarantine"),
        ("mx-only.example.com", "quarantine"),
        ("example.com", "none"),  # np never applies to the org domain itself
    ],
)
async def test_np_applies_exactly_to_non_existent_subdomains(
    domain: str, policy: str, psl: PublicSuffixList
) -> None:
    r, _ = await evaluate_in(NP_ZONE, f"a@{domain}", psl)
    assert (r.result, r.policy, r.disposition) == ("fail", policy, policy)


async def test_np_existence_unknown_is_temperror(psl: PublicSuffixList) -> None:
    r, _ = await evaluate_in(NP_ZONE, "a@slow-aaaa.example.com", psl)
    assert (r.result, r.disposition) == ("temperror", "none")


async def test_np_equal_to_subdomain_policy_needs_no_existence_lookup(psl: PublicSuffixList) -> None:
    zone: dict[str, list[tuple[str, object]] | str] = {
        "_dmarc.example.com": [("TXT", "v=DMARC1; p=reject; np=reject")]
    }
    r, srv = await evaluate_in(zone, "a@ghost.example.com", psl)
    assert (r.result, r.policy) == ("fail", "reject")
    assert srv.count("ghost.example.com") == 0


# End to end: the reply and the Authentication-Results field for step 6 ------------------

E2E_ZONE: dict[str, list[tuple[str, object]] | str] = {
    "sender.example": [("TXT", "v=spf1 -all")],
    "_dmarc.bad-sp.example": [("TXT", "v=DMARC1; p=reject; sp=bogus")],
    "_dmarc.bad-sp-rua.example": [("TXT", "v=DMARC1; p=reject; sp=bogus" + RUA)],
    "_dmarc.sub.good.example": [("TXT", "v=DMARC1; p=bogus")],
    "_dmarc.good.example": [("TXT", "v=DMARC1; p=reject")],
}


def _ar_field(content: bytes) -> str:
    header = content.split(b"\r\n\r\n", 1)[0].decode()
    (field,) = [f for f in re.split(r"\r\n(?![ \t])", header) if f.startswith("Authentication-Results:")]
    return " ".join(field.partition(":")[2].split())


async def test_end_to_end_invalid_records_deliver_with_the_right_header(
    backend: RecordingBackend, start_proxy: Any
) -> None:
    with DnsServer(dict(E2E_ZONE)) as srv:
        proxy = await start_proxy({"dns": {"nameservers": [srv.address], "timeout": 3.0}})
        async with RawClient(proxy.host, proxy.port) as client:
            await client.connect()
            replies = []
            for author in (
                "a@bad-sp.example",
                "a@bad-sp-rua.example",
                "a@sub.good.example",
                "a@good.example",
            ):
                await client.cmd("RSET")
                msg = make_message().replace(b"From: ", b"X-Old-From: ", 1)
                replies.append(
                    await client.send_message(
                        "x@sender.example", ["bob@example.org"], f"From: {author}\r\n".encode() + msg
                    )
                )
        # The valid p=reject still rejects; the server keeps serving after it.
        assert [r.code for r in replies] == [250, 250, 250, 550]
        assert replies[3].text == "5.7.1 Email rejected per DMARC policy for good.example"
        async with RawClient(proxy.host, proxy.port) as client:
            assert (await client.connect()).code == 220
    fields = [_ar_field(bytes(m.content)) for m in backend.messages]
    assert len(fields) == 3
    assert "dmarc=none (invalid sp=bogus, no valid rua at _dmarc.bad-sp.example: not applied)" in fields[0]
    assert "dmarc=fail (p=none dis=none) header.from=bad-sp-rua.example policy.dmarc=none" in fields[1]
    assert "dmarc=none (invalid p=bogus, no valid rua at _dmarc.sub.good.example: not applied)" in fields[2]
    assert all([r.method for r in parse_authentication_results(f).results][-1] == "dmarc" for f in fields)
