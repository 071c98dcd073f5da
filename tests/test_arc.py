"""ARC chain validation with chains sealed at test time and keys on a real DNS server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from smtpproxy.auth.arc import ArcVerifier
from smtpproxy.dns import Resolver
from tests.dkimkeys import KeyPair, arc_seal, message, rsa_key, sign
from tests.dnsserver import DnsServer


@pytest.fixture(scope="module")
def key() -> KeyPair:
    return rsa_key(2048)


@pytest.fixture
def dns(key: KeyPair) -> Iterator[DnsServer]:
    zone: dict[str, list[tuple[str, object]] | str] = {
        "sel._domainkey.example.org": [("TXT", key.txt)],
        "arc._domainkey.forwarder.example": [("TXT", key.txt)],
        "arc._domainkey.list.example": [("TXT", key.txt)],
        "slow._domainkey.list.example": "TIMEOUT",
    }
    with DnsServer(zone) as srv:
        yield srv


@pytest.fixture
async def verifier(dns: DnsServer) -> AsyncIterator[ArcVerifier]:
    resolver = Resolver([dns.address], timeout=0.5)
    yield ArcVerifier(resolver)
    await resolver.close()


def hop(msg: bytes, key: KeyPair, domain: str, results: str, selector: str = "arc") -> bytes:
    """What a forwarder does: record its own A-R, then seal the message."""
    with_ar = f"Authentication-Results: {domain}; {results}\r\n".encode() + msg
    return arc_seal(with_ar, key, domain=domain, selector=selector, srv_id=domain)


@pytest.fixture
def one_hop(key: KeyPair) -> bytes:
    signed = sign(message(), key)
    return hop(signed, key, "forwarder.example", "dkim=pass header.d=example.org")


async def test_unsealed_message_is_none(verifier: ArcVerifier) -> None:
    r = await verifier.verify(message())
    assert (r.result, r.instances, r.domains) == ("none", 0, ())


async def test_one_hop_chain_passes(verifier: ArcVerifier, one_hop: bytes) -> None:
    r = await verifier.verify(one_hop)
    assert (r.result, r.instances, r.domains, r.oldest_pass) == ("pass", 1, ("forwarder.example",), 1)


async def test_two_hop_chain_passes_with_sealers_oldest_first(
    verifier: ArcVerifier, one_hop: bytes, key: KeyPair
) -> None:
    two = hop(one_hop, key, "list.example", "arc=pass")
    r = await verifier.verify(two)
    assert (r.result, r.instances, r.domains) == ("pass", 2, ("forwarder.example", "list.example"))


async def test_body_changed_after_sealing_fails(verifier: ArcVerifier, one_hop: bytes) -> None:
    r = await verifier.verify(one_hop.replace(b"This is a test.", b"This is a tast."))
    assert r.result == "fail"
    assert "ARC-Message-Signature" in r.reason


async def test_list_rewrite_between_hops_still_passes_with_oldest_pass(
    verifier: ArcVerifier, one_hop: bytes, key: KeyPair
) -> None:
    # A mailing list changes the subject, then seals: the chain holds, the first AMS no longer verifies.
    edited = one_hop.replace(b"Subject: Hello", b"Subject: [list] Hello")
    r = await verifier.verify(hop(edited, key, "list.example", "arc=pass"))
    assert (r.result, r.instances, r.oldest_pass) == ("pass", 2, 2)


async def test_seal_header_tampered_fails(verifier: ArcVerifier, one_hop: bytes) -> None:
    r = await verifier.verify(
        one_hop.replace(b"dkim=pass header.d=example.org", b"dkim=pass header.d=evil.example")
    )
    assert r.result == "fail"


async def test_missing_sealer_key_fails(verifier: ArcVerifier, key: KeyPair) -> None:
    sealed = hop(message(), key, "unknown.example", "spf=pass smtp.mailfrom=example.org")
    r = await verifier.verify(sealed)
    assert (r.result, r.domains) == ("fail", ("unknown.example",))


async def test_key_lookup_timeout_is_temperror(verifier: ArcVerifier, key: KeyPair) -> None:
    sealed = hop(message(), key, "list.example", "spf=pass smtp.mailfrom=example.org", selector="slow")
    r = await verifier.verify(sealed)
    assert r.result == "temperror"


async def test_incomplete_set_fails(verifier: ArcVerifier, one_hop: bytes) -> None:
    lines = one_hop.split(b"\r\n")
    start = next(i for i, line in enumerate(lines) if line.startswith(b"ARC-Seal:"))
    end = start + 1
    while lines[end].startswith((b" ", b"\t")):
        end += 1
    r = await verifier.verify(b"\r\n".join(lines[:start] + lines[end:]))
    assert r.result == "fail"
    assert "Incomplete ARC set" in r.reason


@pytest.mark.parametrize(
    "fields",
    [
        b"ARC-Seal: i=1; garbage\r\nARC-Message-Signature: i=1; \x00\xff\r\n"
        b"ARC-Authentication-Results: i=1; x\r\n",
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=x.example; s=arc; b=AAAA\r\n",
        b"ARC-Seal: i=51; a=rsa-sha256; cv=pass; d=x.example; s=arc; b=AAAA\r\n",
    ],
)
async def test_garbage_arc_fields_fail_without_raising(verifier: ArcVerifier, fields: bytes) -> None:
    r = await verifier.verify(fields + message())
    assert r.result == "fail"
    assert all(32 <= ord(c) < 127 for c in r.reason)
