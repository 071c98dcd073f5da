"""ARC chain validation with chains sealed at test time and keys on a real DNS server."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import dkim
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.auth.arc import Arc, ArcVerifier
from smtpproxy.auth.dkimkey import KeyCache
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
def verifier(resolver: Resolver) -> ArcVerifier:
    return ArcVerifier(resolver)


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


# -- our signature checks against dkimpy's, on tampered chains ------------------


@functools.cache
def _differential_chain() -> tuple[bytes, dict[bytes, bytes]]:
    """A two-hop chain over a signed message, and the key records by DNS name."""
    strong, other = rsa_key(1024), rsa_key(1024)
    records = {
        b"sel._domainkey.example.org.": strong.txt.encode(),
        b"arc._domainkey.forwarder.example.": strong.txt.encode(),
        b"arc._domainkey.list.example.": other.txt.encode(),
    }
    one = hop(
        sign(message(body="Hi Bob,\r\n\r\nsome  text\t here \r\n\r\n"), strong),
        strong,
        "forwarder.example",
        "dkim=pass",
    )
    return hop(one, other, "list.example", "arc=pass"), records


def _outcome(arc: Any, dnsfunc: Any) -> tuple[Any, ...]:
    try:
        cv, results, reason = arc.verify(dnsfunc=dnsfunc)
    except Exception as err:  # compared, whatever it is
        return ("raised", type(err).__name__)
    fields = ("instance", "ams-valid", "as-valid", "cv")
    return cv, reason, [tuple(r.get(f) for f in fields) for r in results]


@settings(max_examples=150, deadline=None)
@given(
    where=st.floats(min_value=0, max_value=1, exclude_max=True),
    action=st.sampled_from(["replace", "delete", "insert_space", "drop_line", "no_key", "swap_key"]),
    byte=st.sampled_from(b"aZ0 \t:;=/+"),
)
def test_signature_checks_agree_with_dkimpy(where: float, action: str, byte: int) -> None:
    chain, records = _differential_chain()
    records = dict(records)
    data = bytearray(chain)
    pos = int(where * len(data))
    if action == "replace":
        data[pos] = byte
    elif action == "delete":
        del data[pos]
    elif action == "insert_space":
        data[pos:pos] = b" "
    elif action == "drop_line":
        start = data.rfind(b"\r\n", 0, pos) + 2 if data.rfind(b"\r\n", 0, pos) >= 0 else 0
        end = data.find(b"\r\n", pos)
        del data[start : end + 2 if end >= 0 else len(data)]
    elif action == "no_key":
        del records[sorted(records)[int(where * len(records))]]
    else:
        names = sorted(records)
        records[names[0]], records[names[-1]] = records[names[-1]], records[names[0]]
    message_bytes = bytes(data)

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return records.get(name.lower(), b"")

    try:
        theirs = dkim.ARC(message_bytes, minkey=1024)
    except Exception:  # unparseable: nothing to compare
        return
    ours = Arc(message_bytes, KeyCache(), minkey=1024)
    assert _outcome(ours, dnsfunc) == _outcome(theirs, dnsfunc)


def test_the_differential_chain_passes_untampered() -> None:
    chain, records = _differential_chain()
    outcome = _outcome(Arc(chain, KeyCache(), minkey=1024), lambda name, timeout=5: records.get(name, b""))
    assert outcome[0] == dkim.CV_Pass


def test_keys_below_the_minimum_fail_as_in_dkimpy() -> None:
    chain, records = _differential_chain()  # sealed with 1024-bit keys

    def dnsfunc(name: bytes, timeout: float = 5) -> bytes:
        return records.get(name, b"")

    ours = _outcome(Arc(chain, KeyCache(), minkey=2048), dnsfunc)
    assert ours == _outcome(dkim.ARC(chain, minkey=2048), dnsfunc)
    assert ours[0] == dkim.CV_Fail
