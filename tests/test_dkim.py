"""DKIM verification against keys published on a real DNS server on loopback."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.auth.dkim import DkimSignatureResult, DkimVerifier
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
async def resolver(dns: DnsServer) -> AsyncIterator[Resolver]:
    r = Resolver([dns.address], timeout=0.5)
    yield r
    await r.close()


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
