"""Outbound DKIM signing: signed mail verifies with our verifier and with dkimpy, keys rotate on reload."""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dkim
import pytest
from dns.message import make_query
from dns.query import udp as udp_query
from dns.rdatatype import TXT

from smtpproxy.auth.dkim import DkimVerifier
from smtpproxy.cli import main
from smtpproxy.config import ConfigError, DkimSignKey, build_config
from smtpproxy.dns import Resolver
from smtpproxy.submission.dkimkeys import generate, load_key
from smtpproxy.submission.dkimsign import DkimSigner, SignerError, include_headers
from tests.dkimkeys import message
from tests.dnsserver import DnsServer


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer({}) as srv:
        yield srv


def _key(tmp: Path, dns_server: DnsServer, selector: str, kind: str) -> DkimSignKey:
    """Write a new key of ``kind`` and publish its record."""
    pem, txt = generate(kind)
    path = tmp / f"{selector}.key"
    path.write_bytes(pem)
    dns_server.set(f"{selector}._domainkey.example.org", [("TXT", txt)])
    return DkimSignKey(domain="example.org", selector=selector, key=path)


def dkimpy_verify(msg: bytes, dns_server: DnsServer) -> list[bool]:
    """dkimpy's own verdict on every signature, keys from the loopback DNS server."""

    def txt(name: bytes, timeout: int = 5) -> bytes | None:
        query = make_query(name.decode(), TXT)
        answer = udp_query(query, dns_server.host, port=dns_server.port, timeout=2.0)
        for rrset in answer.answer:
            for rdata in rrset:
                return b"".join(rdata.strings)
        return None

    d = dkim.DKIM(msg)
    count = sum(1 for name, _ in d.headers if name.lower() == b"dkim-signature")
    return [d.verify(idx=i, dnsfunc=txt) for i in range(count)]


@pytest.fixture
def keys(tmp_path: Path, dns: DnsServer) -> list[DkimSignKey]:
    return [_key(tmp_path, dns, "s2026r", "rsa"), _key(tmp_path, dns, "s2026e", "ed25519")]


async def test_dual_signed_message_verifies_with_our_verifier_and_dkimpy(
    keys: list[DkimSignKey], dns: DnsServer, resolver: Resolver
) -> None:
    signed = DkimSigner(keys).sign(message(), "example.org")
    results = await DkimVerifier(resolver).verify(signed)
    assert [(r.result, r.selector, r.algorithm) for r in results] == [
        ("pass", "s2026r", "rsa-sha256"),
        ("pass", "s2026e", "ed25519-sha256"),
    ]
    assert dkimpy_verify(signed, dns) == [True, True]


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
async def test_each_key_type_alone_verifies(
    tmp_path: Path, dns: DnsServer, resolver: Resolver, kind: str
) -> None:
    signed = DkimSigner([_key(tmp_path, dns, "one", kind)]).sign(message(), "example.org")
    assert [r.result for r in await DkimVerifier(resolver).verify(signed)] == ["pass"]
    assert dkimpy_verify(signed, dns) == [True]


async def test_relaxed_relaxed_and_the_signed_header_list(keys: list[DkimSignKey]) -> None:
    signed = DkimSigner(keys[:1]).sign(message(extra_headers="X-Mailer: test\r\n"), "example.org")
    tags = dkim.util.parse_tag_value(
        signed.split(b"\r\n\r\n")[0].split(b"\r\nFrom:")[0][len(b"DKIM-Signature:") :]
    )
    assert tags[b"c"] == b"relaxed/relaxed"
    signed_fields = [h.strip() for h in tags[b"h"].split(b":")]
    # From, To and Subject once more than they occur: a second one breaks the signature.
    assert signed_fields.count(b"from") == 2
    assert signed_fields.count(b"to") == 2
    assert signed_fields.count(b"subject") == 2
    assert b"date" in signed_fields and b"message-id" in signed_fields
    assert b"x-mailer" not in signed_fields


async def test_an_added_subject_breaks_the_oversigned_signature(
    keys: list[DkimSignKey], resolver: Resolver
) -> None:
    signed = DkimSigner(keys).sign(message(), "example.org")
    head, body = signed.split(b"\r\n\r\n", 1)
    forged = head + b"\r\nSubject: You won\r\n\r\n" + body
    assert [r.result for r in await DkimVerifier(resolver).verify(forged)] == ["fail", "fail"]


def test_an_absent_to_is_still_oversigned() -> None:
    msg = b"From: a@example.org\r\nSubject: x\r\n\r\nbody\r\n"
    assert include_headers(msg) == [b"from", b"subject", b"from", b"to", b"subject"]


def test_a_domain_without_keys_is_not_signed(keys: list[DkimSignKey]) -> None:
    signer = DkimSigner(keys)
    assert signer.domains == {"example.org"}
    assert signer.sign(message(), "example.net") == message()


async def test_reload_rotates_to_the_new_key(
    tmp_path: Path, dns: DnsServer, resolver: Resolver, keys: list[DkimSignKey]
) -> None:
    signer = DkimSigner(keys[:1])
    old = signer.sign(message(), "example.org")
    pem, txt = generate("rsa")
    keys[0].key.write_bytes(pem)
    assert signer.reload()
    new = signer.sign(message(), "example.org")
    dns.set("s2026r._domainkey.example.org", [("TXT", txt)])
    assert [r.result for r in await DkimVerifier(resolver).verify(new)] == ["pass"]
    assert [r.result for r in await DkimVerifier(resolver).verify(old)] == ["fail"]


async def test_a_bad_key_on_reload_keeps_every_old_key(
    dns: DnsServer, resolver: Resolver, keys: list[DkimSignKey]
) -> None:
    signer = DkimSigner(keys)
    keys[1].key.write_bytes(b"not a key")
    assert not signer.reload()
    signed = signer.sign(message(), "example.org")
    assert [r.result for r in await DkimVerifier(resolver).verify(signed)] == ["pass", "pass"]


def test_unusable_key_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "bad.key").write_text("-----BEGIN PRIVATE KEY-----\nxx\n-----END PRIVATE KEY-----\n")
    entries = [
        DkimSignKey(domain="example.org", selector="a", key=tmp_path / "missing.key"),
        DkimSignKey(domain="example.org", selector="b", key=tmp_path / "bad.key"),
    ]
    with pytest.raises(SignerError) as err:
        DkimSigner(entries)
    assert err.value.problems[0].startswith("dkim_sign[0].key: expected a readable key file")
    assert err.value.problems[1].startswith("dkim_sign[1].key: expected a PEM private key")


def test_small_rsa_keys_are_refused(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    from tests.dkimkeys import weak_rsa_key

    pem = serialization.load_pem_private_key(weak_rsa_key(512).private, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    (tmp_path / "weak.key").write_bytes(pem)
    with pytest.raises(ValueError, match="at least 1024 bits, got 512"):
        load_key(tmp_path / "weak.key", "example.org", "weak")


def test_config_validates_domain_and_selector(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_config(
            {"rules": None, "dkim_sign": [{"domain": "not a domain", "selector": "a b", "key": "k"}]},
            base_dir=tmp_path,
        )
    text = "\n".join(err.value.problems)
    assert "dkim_sign.0.domain: expected a domain name like example.org, got 'not a domain'" in text
    assert "dkim_sign.0.selector: expected a DKIM selector" in text


class ThreadRecordingSigner(DkimSigner):
    def sign(self, message: bytes, domain: str) -> bytes:
        self.thread = threading.current_thread()
        return super().sign(message, domain)


async def test_large_messages_are_signed_in_a_worker_thread(keys: list[DkimSignKey]) -> None:
    signer = ThreadRecordingSigner(keys, inline_max_bytes=1000)
    await signer.sign_async(message(body="x" * 2000 + "\r\n"), "example.org")
    assert signer.thread is not threading.main_thread()
    await signer.sign_async(message(), "example.org")
    assert signer.thread is threading.main_thread()


async def test_keygen_writes_a_private_key_and_prints_its_record(
    tmp_path: Path, capsys: Any, dns: DnsServer, resolver: Resolver
) -> None:
    out = tmp_path / "k.pem"
    assert main(["dkim", "keygen", "Example.ORG", "s2026e", "--type", "ed25519", "--out", str(out)]) == 0
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o600
    printed = capsys.readouterr().out
    record = next(line for line in printed.splitlines() if "IN TXT" in line)
    assert record.startswith('s2026e._domainkey.example.org. IN TXT ( "v=DKIM1; k=ed25519; p=')
    dns.set("s2026e._domainkey.example.org", [("TXT", record.split('"')[1])])
    signer = DkimSigner([DkimSignKey(domain="example.org", selector="s2026e", key=out)])
    signed = signer.sign(message(), "example.org")
    assert [r.result for r in await DkimVerifier(resolver).verify(signed)] == ["pass"]
    # A second run never replaces a key whose record may be published.
    assert main(["dkim", "keygen", "example.org", "s2026e", "--out", str(out)]) == 1
    assert "exists, not overwritten" in capsys.readouterr().err


async def test_keygen_rsa_record_is_split_into_txt_strings(
    tmp_path: Path, capsys: Any, dns: DnsServer, resolver: Resolver
) -> None:
    out = tmp_path / "r.pem"
    assert main(["dkim", "keygen", "example.org", "s2026r", "--out", str(out)]) == 0
    record = next(line for line in capsys.readouterr().out.splitlines() if "IN TXT" in line)
    strings = record.split('"')[1::2]
    assert len(strings) == 2 and all(len(s) <= 255 for s in strings)
    dns.set("s2026r._domainkey.example.org", [("TXT", strings)])
    signer = DkimSigner([DkimSignKey(domain="example.org", selector="s2026r", key=out)])
    assert dkimpy_verify(signer.sign(message(), "example.org"), dns) == [True]


@pytest.mark.parametrize(
    ("argv", "error"),
    [
        (["bad domain", "s1"], "expected a domain name"),
        (["example.org", "bad selector"], "expected a DKIM selector"),
        (["example.org", "s1", "--bits", "512"], "--bits: expected 1024..8192"),
    ],
)
def test_keygen_refuses_bad_input(tmp_path: Path, capsys: Any, argv: list[str], error: str) -> None:
    assert main(["dkim", "keygen", *argv, "--out", str(tmp_path / "k")]) == 2
    assert error in capsys.readouterr().err
    assert not (tmp_path / "k").exists()
