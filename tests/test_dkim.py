"""DKIM verification against keys published on a real DNS server on loopback."""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Iterator
from typing import Any

import dkim
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, utils
from dkim import canonicalization, crypto
from hypothesis import example, given, settings
from hypothesis import strategies as st

from smtpproxy.auth.dkim import DkimSignatureResult, DkimVerifier
from smtpproxy.auth.dkimhash import _BTAG, Body, parse_message, relaxed_body, relaxed_header, verify_signature
from smtpproxy.auth.dkimkey import DkimKey, KeyCache, parse_key, rsa_verify
from smtpproxy.dns import Resolver
from tests.dkimkeys import KeyPair, ed25519_key, message, rsa_key, sign, weak_rsa_key
from tests.dnsserver import DnsServer


@pytest.fixture(scope="module")
def rsa() -> KeyPair:
    return rsa_key(2048)


@pytest.fixture(scope="module")
def ed() -> KeyPair:
    return ed25519_key()


@pytest.fixture(scope="module")
def weak() -> KeyPair:
    return weak_rsa_key(512)


@pytest.fixture
def dns(rsa: KeyPair, ed: KeyPair, weak: KeyPair) -> Iterator[DnsServer]:
    zone: dict[str, list[tuple[str, object]] | str] = {
        "sel._domainkey.example.org": [("TXT", rsa.txt)],
        "ed._domainkey.example.org": [("TXT", ed.txt)],
        "weak._domainkey.example.org": [("TXT", weak.txt)],
        "revoked._domainkey.example.org": [("TXT", "v=DKIM1; k=rsa; p=")],
        "garbage._domainkey.example.org": [("TXT", "v=DKIM1; k=rsa; p=!!notbase64!!")],
        "slow._domainkey.example.org": "TIMEOUT",
        "broken._domainkey.example.org": "SERVFAIL",
        "sel._domainkey.other.example": [("TXT", rsa.txt)],
    }
    with DnsServer(zone) as srv:
        yield srv


@pytest.fixture
def verifier(resolver: Resolver) -> DkimVerifier:
    return DkimVerifier(resolver)


async def one(verifier: DkimVerifier, msg: bytes) -> DkimSignatureResult:
    results = await verifier.verify(msg)
    assert len(results) == 1, results
    return results[0]


@pytest.mark.parametrize(
    "canon",
    [(b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"relaxed", b"simple"), (b"simple", b"relaxed")],
)
async def test_rsa_sha256_passes_in_every_canonicalization(
    verifier: DkimVerifier, rsa: KeyPair, canon: tuple[bytes, bytes]
) -> None:
    r = await one(verifier, sign(message(), rsa, canonicalize=canon))
    assert r.result == "pass", r.reason
    assert (r.domain, r.selector, r.algorithm, r.identity) == (
        "example.org",
        "sel",
        "rsa-sha256",
        "@example.org",
    )
    assert len(r.b_prefix) == 8


async def test_ed25519_signature_passes(verifier: DkimVerifier, ed: KeyPair) -> None:
    r = await one(verifier, sign(message(), ed, selector="ed"))
    assert (r.result, r.algorithm) == ("pass", "ed25519-sha256")


async def test_unsigned_message_gives_no_results(verifier: DkimVerifier) -> None:
    assert await verifier.verify(message()) == []


async def test_tampered_body_fails(verifier: DkimVerifier, rsa: KeyPair) -> None:
    signed = sign(message(), rsa)
    r = await one(verifier, signed.replace(b"This is a test.", b"Send me money."))
    assert r.result == "fail"
    assert "body hash" in r.reason


async def test_tampered_header_fails(verifier: DkimVerifier, rsa: KeyPair) -> None:
    signed = sign(message(), rsa)
    r = await one(verifier, signed.replace(b"Subject: Hello", b"Subject: Urgent invoice"))
    assert r.result == "fail"
    assert r.reason == "signature did not verify"


async def test_tampered_ed25519_header_fails(verifier: DkimVerifier, ed: KeyPair) -> None:
    signed = sign(message(), ed, selector="ed")
    r = await one(verifier, signed.replace(b"Subject: Hello", b"Subject: Hullo"))
    assert r.result == "fail"


async def test_missing_key_is_permerror(verifier: DkimVerifier, rsa: KeyPair) -> None:
    r = await one(verifier, sign(message(), rsa, selector="nosuch"))
    assert (r.result, r.reason) == ("permerror", "no key for signature")


async def test_revoked_key_is_permerror(verifier: DkimVerifier, rsa: KeyPair) -> None:
    r = await one(verifier, sign(message(), rsa, selector="revoked"))
    assert (r.result, r.reason) == ("permerror", "key revoked")


async def test_unparseable_key_record_is_permerror(verifier: DkimVerifier, rsa: KeyPair) -> None:
    r = await one(verifier, sign(message(), rsa, selector="garbage"))
    assert r.result == "permerror"
    assert r.reason.startswith("bad key record")


async def test_key_type_not_matching_algorithm_is_permerror(verifier: DkimVerifier, ed: KeyPair) -> None:
    # Ed25519 signature, but the selector publishes an RSA key.
    r = await one(verifier, sign(message(), ed, selector="sel"))
    assert r.result == "permerror"
    assert "does not match" in r.reason


async def test_512_bit_key_is_policy(verifier: DkimVerifier, weak: KeyPair) -> None:
    r = await one(verifier, sign(message(), weak, selector="weak"))
    assert r.result == "policy"
    assert "512 bits" in r.reason


async def test_512_bit_key_accepted_when_minimum_lowered(resolver: Resolver, weak: KeyPair) -> None:
    r = await one(DkimVerifier(resolver, min_key_bits=512), sign(message(), weak, selector="weak"))
    assert r.result == "pass"


async def test_dns_timeout_is_temperror(verifier: DkimVerifier, rsa: KeyPair) -> None:
    r = await one(verifier, sign(message(), rsa, selector="slow"))
    assert (r.result, r.reason) == ("temperror", "key lookup timeout")


async def test_dns_servfail_is_temperror(verifier: DkimVerifier, rsa: KeyPair) -> None:
    r = await one(verifier, sign(message(), rsa, selector="broken"))
    assert (r.result, r.reason) == ("temperror", "key lookup servfail")


async def test_length_tag_covering_whole_body_passes(verifier: DkimVerifier, rsa: KeyPair) -> None:
    r = await one(verifier, sign(message(), rsa, length=True))
    assert r.result == "pass"
    assert "l=" in r.reason


async def test_length_tag_with_appended_content_is_policy(verifier: DkimVerifier, rsa: KeyPair) -> None:
    signed = sign(message(), rsa, length=True)
    r = await one(verifier, signed + b"\r\nAppended by someone else: click here\r\n")
    assert r.result == "policy"
    assert "unsigned" in r.reason


async def test_two_signatures_one_good_one_bad(verifier: DkimVerifier, rsa: KeyPair, ed: KeyPair) -> None:
    signed = sign(sign(message(), ed, selector="ed"), rsa, domain="other.example", selector="nosuch")
    results = await verifier.verify(signed)
    assert [(r.domain, r.result) for r in results] == [
        ("other.example", "permerror"),
        ("example.org", "pass"),
    ]


async def test_good_and_tampered_signature_are_reported_apart(verifier: DkimVerifier, rsa: KeyPair) -> None:
    # The outer signature covers a Subject that is changed afterwards; the inner one does not sign it.
    inner = sign(message(), rsa, domain="other.example")
    both = sign(inner, rsa)
    results = await verifier.verify(both)
    assert [r.result for r in results] == ["pass", "pass"]
    tampered = both.replace(b"Date: Mon, 01 Jan 2024", b"Date: Tue, 02 Jan 2024")
    assert [r.result for r in await verifier.verify(tampered)] == ["fail", "fail"]


@pytest.mark.parametrize(
    "field",
    [
        b"DKIM-Signature: this is not a tag list at all\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; d=evil.example; s=sel; b=AA; bh=AA; h=from\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; s=sel; b=AAAA; bh=AAAA; h=from\r\n",
        b"DKIM-Signature: v=1; a=rot13; d=example.org; s=sel; b=AAAA; bh=AAAA; h=from\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; b=!!!; bh=AAAA; h=from\r\n",
        b"DKIM-Signature: \x00\xff\xfe; d=\r\n",
        b"DKIM-Signature: v=1; a=rsa-sha256; d=example.org; s=sel; b=AAAA; bh=AAAA; h=from; x=1000\r\n",
    ],
)
async def test_malformed_signature_field_is_permerror(verifier: DkimVerifier, field: bytes) -> None:
    r = await one(verifier, field + message())
    assert r.result == "permerror"
    assert all(32 <= ord(c) < 127 for c in r.reason + r.domain + r.selector)


async def test_malformed_field_next_to_good_signature(verifier: DkimVerifier, rsa: KeyPair) -> None:
    signed = sign(message(), rsa)
    results = await verifier.verify(b"DKIM-Signature: garbage\r\n" + signed)
    assert [r.result for r in results] == ["permerror", "pass"]


async def test_unparseable_header_with_signature_is_permerror(verifier: DkimVerifier, rsa: KeyPair) -> None:
    signed = sign(message(), rsa)
    broken = signed.replace(b"To: Bob", b"this line is no header field\r\nTo: Bob")
    r = await one(verifier, broken)
    assert (r.result, r.reason) == ("permerror", "message header unparseable")


async def test_at_most_max_signatures_are_verified(resolver: Resolver, dns: DnsServer, rsa: KeyPair) -> None:
    msg = message()
    for _ in range(4):
        msg = sign(msg, rsa)
    results = await DkimVerifier(resolver, max_signatures=2).verify(msg)
    assert [r.result for r in results] == ["pass", "pass"]


async def test_key_is_fetched_once_for_several_signatures(
    resolver: Resolver, dns: DnsServer, rsa: KeyPair
) -> None:
    msg = sign(sign(message(), rsa), rsa)
    results = await DkimVerifier(resolver).verify(msg)
    assert [r.result for r in results] == ["pass", "pass"]
    assert dns.count("sel._domainkey.example.org", "TXT") == 1


class ThreadRecordingVerifier(DkimVerifier):
    """Records which thread did the CPU work."""

    thread: int | None = None

    def _verify_all(self, *args: Any) -> list[DkimSignatureResult]:
        self.thread = threading.get_ident()
        return super()._verify_all(*args)


async def test_large_message_verified_in_a_worker_thread(resolver: Resolver, rsa: KeyPair) -> None:
    signed = sign(message(body="line of a large message body\r\n" * 100), rsa)
    verifier = ThreadRecordingVerifier(resolver, inline_max_bytes=1024)
    assert [r.result for r in await verifier.verify(signed)] == ["pass"]
    assert verifier.thread not in (None, threading.get_ident())


async def test_small_message_verified_inline(resolver: Resolver, rsa: KeyPair) -> None:
    verifier = ThreadRecordingVerifier(resolver)
    assert [r.result for r in await verifier.verify(sign(message(), rsa))] == ["pass"]
    assert verifier.thread == threading.get_ident()


async def test_identity_tag_is_reported(verifier: DkimVerifier, rsa: KeyPair) -> None:
    r = await one(verifier, sign(message(), rsa, identity=b"alice@mail.example.org"))
    assert (r.result, r.identity) == ("pass", "alice@mail.example.org")


@settings(max_examples=500, deadline=None)
@given(n=st.integers(min_value=0, max_value=1 << 4200), length=st.integers(min_value=-1, max_value=530))
def test_fast_int_conversions_match_dkimpy(n: int, length: int) -> None:
    from smtpproxy.auth import dkimspeed

    str2int, int2str = dkimspeed.ORIGINAL
    assert dkimspeed.int2str(n, length) == int2str(n, length)
    raw = dkimspeed.int2str(n)
    assert dkimspeed.str2int(raw) == str2int(raw) == n


# OpenSSL RSA, cached keys and our hashing agree with dkimpy (dkimkey, dkimhash) ------


def _private(pair: KeyPair) -> Any:
    return serialization.load_pem_private_key(pair.private, password=None)


def _key(pair: KeyPair) -> DkimKey:
    key = parse_key("sel._domainkey.example.org", pair.txt.encode())
    assert isinstance(key, DkimKey)
    return key


class _Hash:
    def __init__(self, name: str, digest: bytes) -> None:
        self.name, self._digest = name, digest

    def digest(self) -> bytes:
        return self._digest


def _dkimpy_verdict(key: DkimKey, algorithm: bytes, digest: bytes, signature: bytes) -> bool:
    name = algorithm.split(b"-")[1].decode()
    return bool(crypto.RSASSA_PKCS1_v1_5_verify(_Hash(name, digest), signature, key.pk))


@pytest.mark.parametrize("algorithm", [b"rsa-sha256", b"rsa-sha1"])
def test_openssl_rsa_agrees_with_dkimpy_on_good_odd_and_bad_signatures(
    rsa: KeyPair, algorithm: bytes
) -> None:
    key = _key(rsa)
    assert key.openssl is not None
    n = key.pk["modulus"]
    hash_cls, hasher = (
        (hashes.SHA256, hashlib.sha256) if algorithm == b"rsa-sha256" else (hashes.SHA1, hashlib.sha1)
    )
    digest = hasher(b"signed header data").digest()
    good = _private(rsa).sign(digest, padding.PKCS1v15(), utils.Prehashed(hash_cls()))
    value = int.from_bytes(good, "big")
    variants = {
        "good": good,
        "plus modulus": (value + n).to_bytes(257, "big"),  # dkimpy reduces it mod n
        "plus 3 moduli, longer": (value + 3 * n).to_bytes(300, "big"),
        "flipped bit": (value ^ 1).to_bytes(256, "big"),
        "empty": b"",
        "short junk": b"\x01\x02",
        "all ones": b"\xff" * 256,
    }
    for name, signature in variants.items():
        expected = _dkimpy_verdict(key, algorithm, digest, signature)
        assert rsa_verify(key, algorithm, digest, signature) is expected, name
    assert rsa_verify(key, algorithm, digest, good)
    other = hasher(b"other data").digest()
    assert not rsa_verify(key, algorithm, other, good)
    assert _dkimpy_verdict(key, algorithm, other, good) is False


def test_signature_with_leading_zero_byte_dropped_agrees_with_dkimpy() -> None:
    pair = rsa_key(1024)
    key, private = _key(pair), _private(pair)
    for i in range(5000):  # about 1 in 256 signatures starts with a zero byte
        digest = hashlib.sha256(b"%d" % i).digest()
        good = private.sign(digest, padding.PKCS1v15(), utils.Prehashed(hashes.SHA256()))
        if good[0] == 0:
            break
    else:
        pytest.fail("no signature with a leading zero byte in 5000 tries")
    short = good.lstrip(b"\x00")
    assert _dkimpy_verdict(key, b"rsa-sha256", digest, short) is True
    assert rsa_verify(key, b"rsa-sha256", digest, short) is True


def test_small_key_uses_dkimpys_arithmetic(weak: KeyPair) -> None:
    key = _key(weak)
    assert key.openssl is None and key.keysize == 512
    digest = hashlib.sha256(b"x").digest()
    assert rsa_verify(key, b"rsa-sha256", digest, b"\x00" * 64) is False


def test_ed25519_key_has_no_openssl_object(ed: KeyPair) -> None:
    key = _key(ed)
    assert key.ktag == b"ed25519" and key.openssl is None


def test_key_cache_parses_a_record_once_and_is_bounded(rsa: KeyPair, ed: KeyPair) -> None:
    cache = KeyCache(size=2)
    first = cache.get("sel._domainkey.example.org", rsa.txt.encode())
    assert cache.get("sel._domainkey.example.org", rsa.txt.encode()) is first
    cache.get("ed._domainkey.example.org", ed.txt.encode())
    assert cache.get("x._domainkey.example.org", b"v=DKIM1; k=rsa; p=") == "key revoked"
    assert len(cache) == 2
    assert cache.get("sel._domainkey.example.org", rsa.txt.encode()) is not first  # evicted, parsed anew
    bad = cache.get("g._domainkey.example.org", b"v=DKIM1; k=rsa; p=!!notbase64!!")
    assert isinstance(bad, str) and bad.startswith("bad key record:")


_WSP_TEXT = st.binary(max_size=60).map(lambda b: bytes(b" \t\r\nab"[x % 6] for x in b))


@settings(max_examples=400, deadline=None)
@given(body=_WSP_TEXT, name=st.sampled_from([b"Subject", b"X-Odd ", b"from"]), value=_WSP_TEXT)
def test_relaxed_canonicalisation_equals_dkimpys(body: bytes, name: bytes, value: bytes) -> None:
    assert relaxed_body(body) == canonicalization.Relaxed.canonicalize_body(body)
    assert [relaxed_header(name, value)] == canonicalization.Relaxed.canonicalize_headers([(name, value)])


def _dkimpy_outcome(msg: bytes, record: bytes) -> object:
    try:
        return dkim.DKIM(msg, minkey=0).verify(dnsfunc=lambda name, timeout=5: record)
    except dkim.DKIMException as err:
        return (type(err).__name__, str(err))


def _our_outcome(msg: bytes, record: bytes) -> object:
    headers, body = dkim.rfc822_parse(msg)
    sig = next(v for k, v in headers if k.lower() == b"dkim-signature")
    key = parse_key("sel._domainkey.example.org", record)
    assert isinstance(key, DkimKey)
    try:
        return verify_signature(headers, Body(body), dkim.util.parse_tag_value(sig), 0, key)
    except dkim.DKIMException as err:
        return (type(err).__name__, str(err))


_CANON = st.sampled_from(
    [(b"relaxed", b"relaxed"), (b"simple", b"simple"), (b"relaxed", b"simple"), (b"simple", b"relaxed")]
)
_LINE = st.text(st.sampled_from("ab \t"), max_size=8)


@settings(max_examples=60, deadline=None)
@given(
    canon=_CANON,
    body_lines=st.lists(_LINE, max_size=6),
    subject=_LINE,
    fold=st.booleans(),
    length=st.booleans(),
    tamper=st.sampled_from(["none", "body", "subject", "space", "from", "from_top", "bh", "lf"]),
    use_ed=st.booleans(),
)
def test_hashing_agrees_with_dkimpy(
    rsa: KeyPair,
    ed: KeyPair,
    canon: tuple[bytes, bytes],
    body_lines: list[str],
    subject: str,
    fold: bool,
    length: bool,
    tamper: str,
    use_ed: bool,
) -> None:
    pair = ed if use_ed else rsa
    subject = ("Hi" + subject + ("\r\n\tfolded  part" if fold else "")).strip() or "Hi"
    msg = sign(
        message(subject=subject, body="".join(f"{x}\r\n" for x in body_lines) + "\r\n"),
        pair,
        canonicalize=canon,
        length=length,
    )
    if tamper == "body":
        msg += b"appended\r\n"
    elif tamper == "subject":
        msg = msg.replace(b"Subject: Hi", b"Subject: Ho")
    elif tamper == "space":
        msg = msg.replace(b"Subject: Hi", b"Subject:  Hi ")
    elif tamper == "from":
        msg = msg.replace(b"\r\n\r\n", b"\r\nFrom: Mallory <m@evil.example>\r\n\r\n", 1)
    elif tamper == "from_top":  # dkimpy hashes an extra From field even when h= names only one
        msg = b"From: Mallory <m@evil.example>\r\n" + msg
    elif tamper == "bh":
        msg = msg.replace(b"bh=", b"bh=AAAA", 1)
    elif tamper == "lf":
        msg = msg.replace(b"\r\n", b"\n")
    record = pair.txt.encode()
    assert _our_outcome(msg, record) == _dkimpy_outcome(msg, record)


def test_bad_c_value_and_tlsrpt_key_raise_as_in_dkimpy(rsa: KeyPair) -> None:
    msg = sign(message(), rsa)
    bad_c = msg.replace(b"c=relaxed/relaxed", b"c=fancy/relaxed", 1)
    assert _our_outcome(bad_c, rsa.txt.encode()) == _dkimpy_outcome(bad_c, rsa.txt.encode())
    assert _our_outcome(bad_c, rsa.txt.encode())[0] == "MessageFormatError"  # type: ignore[index]
    tlsrpt = (rsa.txt + "; s=tlsrpt").encode()
    assert _our_outcome(msg, tlsrpt) == _dkimpy_outcome(msg, tlsrpt)
    assert _our_outcome(msg, tlsrpt)[0] == "ValidationError"  # type: ignore[index]


def test_body_canonicalised_once_per_algorithm() -> None:
    body = Body(b"a  b \r\n\r\n\r\n")
    relaxed = body.canonical(b"relaxed")
    assert relaxed == b"a b\r\n"
    assert body.canonical(b"relaxed") is relaxed
    assert body.canonical(b"simple") == b"a  b \r\n"


_SIG_TEXT = st.lists(
    st.sampled_from(
        [" ", "\t", "\r\n", "\n", "\r", ";", "b", "=", "bh", "A", "z", "9", "+", "/", "h", ":", "x"]
    ),
    max_size=40,
).map(lambda parts: "".join(parts).encode())


@settings(max_examples=1500, deadline=None)
@given(_SIG_TEXT)
@example(b"v=1; bh=x; b=abc\r\n")
@example(b"v=1; b = a b\r\n c+/=\r\n")
@example(b"v=1; b=\r\n")
@example(b"v=1;b=AB\n")
def test_blanking_b_tag_matches_dkimpys_regex(value: bytes) -> None:
    assert _BTAG.sub(b"\\1", value) == dkim.RE_BTAG.sub(b"\\1", value)


def _rfc822(msg: bytes) -> object:
    try:
        headers, body = dkim.rfc822_parse(msg)
    except Exception as err:
        return (type(err).__name__, str(err))
    return [tuple(h) for h in headers], body


def _ours(msg: bytes) -> object:
    try:
        return parse_message(msg)
    except Exception as err:
        return (type(err).__name__, str(err))


_MSG_TEXT = st.lists(
    st.sampled_from(["\r\n", "\n", "\r", " ", "\t", "A: b", "From x", "From ", "x", ":", "\r\n\r\n", "é"]),
    max_size=14,
).map(lambda parts: "".join(parts).encode())


@settings(max_examples=1500, deadline=None)
@given(_MSG_TEXT)
def test_message_parsing_matches_dkimpy(msg: bytes) -> None:
    assert _ours(msg) == _rfc822(msg)


@pytest.mark.parametrize(
    "msg",
    [b"", b"\r\n", b"\r\nbody\r\n", b"A: b\r\n", b"A: b", b"A: b\r\n\r\n", b" x\r\n", b"bad line\r\n\r\n"],
)
def test_message_parsing_edges_match_dkimpy(msg: bytes) -> None:
    assert _ours(msg) == _rfc822(msg)
