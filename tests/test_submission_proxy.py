"""The submission listeners over real sockets: STARTTLS then AUTH on one port, implicit TLS on another.

A real proxy (passwd_file users, sender_login, DKIM keys) in front of the
recording aiosmtpd backend; the clients are aiosmtplib's, speaking SMTP over
TLS with trustme certificates. Every refusal is followed by a client that is
still served.
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiosmtplib
import argon2
import pytest
import trustme

from smtpproxy.auth.dkim import DkimVerifier
from smtpproxy.dns import Resolver
from smtpproxy.submission.dkimkeys import generate
from tests.backends import RecordingBackend
from tests.dnsserver import DnsServer


def message(from_: str = "Alice <alice@example.org>") -> bytes:
    return (
        f"From: {from_}\r\nTo: carol@elsewhere.example\r\nSubject: Hi\r\n"
        "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\nMessage-ID: <s1@example.org>\r\n\r\nHello\r\n"
    ).encode()


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def client_tls(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return ctx


@pytest.fixture
def keys_dns(dns_server: DnsServer) -> Iterator[DnsServer]:
    yield dns_server
    for selector in ("s2026r", "s2026e"):
        dns_server.remove(f"{selector}._domainkey.example.org")


@pytest.fixture
async def proxy(
    start_proxy: Any, tmp_path: Path, ca: trustme.CA, keys_dns: DnsServer, backend: RecordingBackend
) -> Any:
    cert = ca.issue_cert("mx.test.example", "127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    hasher = argon2.PasswordHasher()
    (tmp_path / "users").write_text(f"alice:{hasher.hash('alice pw')}\nbob:{hasher.hash('bob pw')}\n")
    (tmp_path / "senders").write_text("alice: example.org\nbob: bob@example.com\n")
    keys = []
    for selector, kind in (("s2026r", "rsa"), ("s2026e", "ed25519")):
        pem, txt = generate(kind)
        (tmp_path / f"{selector}.key").write_bytes(pem)
        keys_dns.set(f"{selector}._domainkey.example.org", [("TXT", txt)])
        keys.append({"domain": "example.org", "selector": selector, "key": f"{selector}.key"})
    return await start_proxy(
        {
            "tls": {"cert": "cert.pem", "key": "key.pem"},
            "submission": {
                "listen": "127.0.0.1:0",
                "listen_tls": "127.0.0.1:0",
                "auth": {"passwd_file": "users"},
                "sender_login": "senders",
                "brute_force": {"max_failures_per_ip": 3, "max_failures_per_user": 10, "tarpit": 0.2},
            },
            "dkim_sign": keys,
            "ratelimits": [{"name": "user_msgs", "key": "auth_user", "rate": "2/hour"}],
        }
    )


async def starttls_client(proxy: Any, tls: ssl.SSLContext) -> aiosmtplib.SMTP:
    host, port = proxy.app.submission_address("listen")
    client = aiosmtplib.SMTP(hostname=host, port=port, tls_context=tls, start_tls=False, timeout=10)
    await client.connect()
    await client.ehlo(hostname="laptop.example")
    return client


async def test_auth_is_offered_only_after_starttls_and_refused_before(
    proxy: Any, client_tls: ssl.SSLContext
) -> None:
    client = await starttls_client(proxy, client_tls)
    assert "auth" not in client.esmtp_extensions
    code, text = await client.execute_command(b"AUTH", b"PLAIN", b"AGFsaWNlAGFsaWNlIHB3")
    assert (code, text[:6]) == (538, "5.7.11")
    # Without AUTH, no mail: 530, and the session goes on.
    code, text = await client.execute_command(b"MAIL", b"FROM:<alice@example.org>")
    assert (code, text[:5]) == (530, "5.7.0")
    await client.starttls(server_hostname="mx.test.example")
    await client.ehlo(hostname="laptop.example")
    assert client.esmtp_extensions["auth"].split() == ["PLAIN", "LOGIN"]
    await client.login("alice", "alice pw")
    await client.quit()


async def test_good_password_relays_signed_mail_with_esmtpsa(
    proxy: Any, client_tls: ssl.SSLContext, backend: RecordingBackend, keys_dns: DnsServer
) -> None:
    client = await starttls_client(proxy, client_tls)
    await client.starttls(server_hostname="mx.test.example")
    await client.ehlo(hostname="laptop.example")
    await client.auth_plain("alice", "alice pw")
    # Relays anywhere, with AUTH= on MAIL accepted (RFC 4954 §5).
    await client.sendmail(
        "alice@example.org", ["carol@elsewhere.example"], message(), mail_options=["AUTH=<>"]
    )
    await client.quit()
    received = backend.messages[-1]
    assert received.rcpts == ["carol@elsewhere.example"]
    head = received.content.split(b"\r\n\r\n")[0]
    assert b"with ESMTPSA id" in head and b"Authentication-Results" not in head
    resolver = Resolver([keys_dns.address], timeout=2.0)
    try:
        results = await DkimVerifier(resolver).verify(received.content)
    finally:
        await resolver.close()
    assert [r.result for r in results] == ["pass", "pass"]
    sample = proxy.app.metrics.registry.get_sample_value
    assert sample("smtpproxy_auth_attempts_total", {"result": "success"}) == 1
    assert sample("smtpproxy_dkim_signatures_added_total", {"algorithm": "ed25519-sha256"}) == 1


async def test_bad_password_is_535_login_works_then_brute_force_ends_in_421(
    proxy: Any, client_tls: ssl.SSLContext
) -> None:
    client = await starttls_client(proxy, client_tls)
    await client.starttls(server_hostname="mx.test.example")
    await client.ehlo(hostname="laptop.example")
    for user in ("alice", "nobody"):
        with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
            await client.auth_login(user, "wrong")
        assert (err.value.code, err.value.message) == (535, "5.7.8 Authentication credentials invalid")
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await client.auth_plain("bob", "wrong")
    assert err.value.code == 421
    # Closed; a new connection from the address is refused before any password.
    client.close()
    again = await starttls_client(proxy, client_tls)
    await again.starttls(server_hostname="mx.test.example")
    await again.ehlo(hostname="laptop.example")
    with pytest.raises(aiosmtplib.SMTPAuthenticationError) as err:
        await again.auth_plain("alice", "alice pw")
    assert err.value.code == 421
    again.close()
    # The MX port still serves.
    mx = aiosmtplib.SMTP(hostname=proxy.host, port=proxy.port, timeout=10, start_tls=False)
    await mx.connect()
    await mx.sendmail("x@sender.example", ["user@example.org"], message("x@sender.example"))
    await mx.quit()


async def test_implicit_tls_port_offers_auth_at_once(proxy: Any, client_tls: ssl.SSLContext) -> None:
    host, port = proxy.app.submission_address("listen_tls")
    client = aiosmtplib.SMTP(hostname=host, port=port, use_tls=True, tls_context=client_tls, timeout=10)
    await client.connect()
    await client.ehlo(hostname="laptop.example")
    assert "starttls" not in client.esmtp_extensions
    assert "auth" in client.esmtp_extensions
    await client.login("bob", "bob pw")
    await client.sendmail("bob@example.com", ["dave@elsewhere.example"], message("bob@example.com"))
    await client.quit()


async def test_sender_mismatch_is_553_and_the_session_goes_on(
    proxy: Any, client_tls: ssl.SSLContext, backend: RecordingBackend
) -> None:
    client = await starttls_client(proxy, client_tls)
    await client.starttls(server_hostname="mx.test.example")
    await client.ehlo(hostname="laptop.example")
    await client.login("bob", "bob pw")
    code, text = await client.execute_command(b"MAIL", b"FROM:<alice@example.org>")
    assert (code, text[:5]) == (553, "5.7.1") and "not owned by user bob" in text
    # Envelope fine, header From someone else's: 553 at the end of DATA.
    with pytest.raises(aiosmtplib.SMTPDataError) as err:
        await client.sendmail("bob@example.com", ["carol@elsewhere.example"], message())
    assert err.value.code == 553
    await client.sendmail("bob@example.com", ["carol@elsewhere.example"], message("bob@example.com"))
    await client.quit()
    assert [m.mail_from for m in backend.messages] == ["bob@example.com"]


async def test_per_user_rate_limit_is_450_for_that_user_only(proxy: Any, client_tls: ssl.SSLContext) -> None:
    client = await starttls_client(proxy, client_tls)
    await client.starttls(server_hostname="mx.test.example")
    await client.ehlo(hostname="laptop.example")
    await client.login("alice", "alice pw")
    for _ in range(2):
        await client.sendmail("alice@example.org", ["carol@elsewhere.example"], message())
    with pytest.raises(aiosmtplib.SMTPSenderRefused) as err:
        await client.sendmail("alice@example.org", ["carol@elsewhere.example"], message())
    assert (err.value.code, err.value.message[:5]) == (450, "4.7.1")
    await client.quit()
    other = await starttls_client(proxy, client_tls)
    await other.starttls(server_hostname="mx.test.example")
    await other.ehlo(hostname="laptop.example")
    await other.login("bob", "bob pw")
    await other.sendmail("bob@example.com", ["carol@elsewhere.example"], message("bob@example.com"))
    await other.quit()


async def test_the_mx_port_still_refuses_auth(proxy: Any) -> None:
    mx = aiosmtplib.SMTP(hostname=proxy.host, port=proxy.port, timeout=10, start_tls=False)
    await mx.connect()
    await mx.ehlo(hostname="c.example")
    assert "auth" not in mx.esmtp_extensions
    code, _ = await mx.execute_command(b"AUTH", b"PLAIN", b"AGFsaWNlAGFsaWNlIHB3")
    assert code == 502
    await mx.quit()
