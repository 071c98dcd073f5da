"""Backend TLS cannot be stripped (require_tls), and forwarding the client is never silently dropped."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any

import pytest
import trustme

from smtpproxy.backend import ClientFacts
from smtpproxy.backend.forward import client_attributes, ehlo_name
from tests.backends import RecordingBackend, _ForwardingSMTP, _Handler
from tests.smtpclient import RawClient, make_message


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_context(ca: trustme.CA, tmp_path: Path) -> ssl.SSLContext:
    cert = ca.issue_cert("backend.test", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert_path), str(key_path))
    return ctx


class _XclientSMTP(_ForwardingSMTP):
    """Records EHLO names and answers XCLIENT with the backend's ``xclient_reply``."""

    backend: IdentityBackend

    async def smtp_EHLO(self, hostname: str) -> None:
        self.backend.ehlo_names.append(hostname)
        await super().smtp_EHLO(hostname)

    async def smtp_XCLIENT(self, arg: str) -> None:
        if self.backend.xclient_reply is None:
            await super().smtp_XCLIENT(arg)
        else:
            await self.push(self.backend.xclient_reply)


class IdentityBackend(RecordingBackend):
    """A recording backend offering XCLIENT, with a scriptable XCLIENT reply."""

    def __init__(self) -> None:
        super().__init__(extra_extensions=("XCLIENT NAME ADDR PROTO HELO",))
        self.xclient_reply: str | None = None
        self.ehlo_names: list[str] = []

    def _factory(self) -> Any:
        self.connections += 1
        return _XclientSMTP(self, _Handler(self), hostname="backend.test", loop=asyncio.get_running_loop())


def _errors(proxy: Any, kind: str) -> float:
    return float(proxy.app.metrics.backend_errors.labels(kind)._value.get())


async def _refused_at_mail(proxy: Any) -> None:
    """MAIL gets 451 4.3.0; the same connection and a new one are still served."""
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        r = await c.cmd("MAIL FROM:<s@sender.example>")
        assert r.code == 451 and r.text.startswith("4.3.0"), r
        assert (await c.cmd("NOOP")).code == 250
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
        assert r.code == 451 and r.text.startswith("4.3.0"), r


async def test_require_tls_refuses_a_backend_without_starttls(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"backend_options": {"require_tls": True}})
    await _refused_at_mail(proxy)
    assert backend.messages == []
    assert not any(cmd.startswith("MAIL") for cmd in backend.commands)
    assert _errors(proxy, "tls_required") >= 2


async def test_require_tls_applies_even_with_starttls_off(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"backend_options": {"require_tls": True, "starttls": False}})
    await _refused_at_mail(proxy)
    assert backend.messages == []


async def test_without_require_tls_plaintext_backend_still_gets_mail(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    assert len(backend.messages) == 1


async def test_require_tls_delivers_over_starttls(start_proxy, tls_context: ssl.SSLContext) -> None:
    tls_backend = RecordingBackend(tls_context=tls_context)
    await tls_backend.start()
    try:
        proxy = await start_proxy({"backend_options": {"require_tls": True}}, backend_port=tls_backend.port)
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            for _ in range(2):
                r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
                assert r.code == 250, r
        assert len(tls_backend.messages) == 2
        conn = proxy.app.backend._idle[0]
        assert conn.client.get_transport_info("sslcontext") is not None
        assert _errors(proxy, "tls_required") == 0
    finally:
        await tls_backend.stop()


async def test_require_tls_with_starttls_off_still_upgrades(start_proxy, tls_context: ssl.SSLContext) -> None:
    tls_backend = RecordingBackend(tls_context=tls_context)
    await tls_backend.start()
    try:
        proxy = await start_proxy(
            {"backend_options": {"require_tls": True, "starttls": False}}, backend_port=tls_backend.port
        )
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message())
            ).code == 250
        assert len(tls_backend.messages) == 1
    finally:
        await tls_backend.stop()


@pytest.mark.parametrize("forward", ["xclient", "xforward"])
async def test_forwarding_configured_but_not_offered_is_refused(
    backend: RecordingBackend, start_proxy, forward: str
) -> None:
    # The recording backend offers neither XCLIENT nor XFORWARD unless told to.
    proxy = await start_proxy({"backend_options": {"forward_client": forward}})
    await _refused_at_mail(proxy)
    assert backend.messages == []
    assert not any(cmd.startswith("MAIL") for cmd in backend.commands)
    assert _errors(proxy, "identity") >= 2


async def test_backend_refusing_xclient_gets_no_mail(start_proxy) -> None:
    b = IdentityBackend()
    await b.start()
    try:
        proxy = await start_proxy({"backend_options": {"forward_client": "xclient"}}, backend_port=b.port)
        b.xclient_reply = "550 5.7.0 Error: insufficient authorization"
        await _refused_at_mail(proxy)
        assert b.messages == []
        assert _errors(proxy, "identity") >= 2
    finally:
        await b.stop()


async def test_xclient_connection_is_not_pooled_and_ehlo_carries_client_helo(start_proxy) -> None:
    b = IdentityBackend()
    await b.start()
    try:
        proxy = await start_proxy({"backend_options": {"forward_client": "xclient"}}, backend_port=b.port)
        for helo in ("first.client.example", "second.client.example"):
            async with RawClient(proxy.host, proxy.port) as c:
                await c.connect()
                r = await c.send_message("s@sender.example", ["user@example.org"], make_message(), helo=helo)
                assert r.code == 250, r
        # Each transaction on its own backend connection, none kept for the next client.
        assert len(proxy.app.backend._idle) == 0
        # Our EHLO opens each connection (no reuse), the client's follows its XCLIENT.
        expected = ["mx.test.example", "first.client.example", "mx.test.example", "second.client.example"]
        assert b.ehlo_names == expected
    finally:
        await b.stop()


def test_client_attributes_are_complete_and_xtext_encoded() -> None:
    facts = ClientFacts(ip="192.0.2.1", helo=None, rdns=None, esmtp=False)
    assert client_attributes(facts) == [
        b"ADDR=192.0.2.1",
        b"PROTO=SMTP",
        b"NAME=[UNAVAILABLE]",
        b"HELO=[UNAVAILABLE]",
    ]
    facts = ClientFacts(ip="192.0.2.1", helo="a b=c", rdns="host.example", esmtp=True)
    assert client_attributes(facts)[2:] == [b"NAME=host.example", b"HELO=a+20b+3Dc"]


@pytest.mark.parametrize(
    ("helo", "ip", "expected"),
    [
        ("mail.example.com", "192.0.2.1", "mail.example.com"),
        ("[192.0.2.1]", "192.0.2.1", "[192.0.2.1]"),
        (None, "192.0.2.1", "[192.0.2.1]"),
        ("bad helo", "192.0.2.1", "[192.0.2.1]"),
        ("x\r\nRCPT TO:<a@b>", "192.0.2.1", "[192.0.2.1]"),
        ("é.example", "2001:db8::1", "[IPv6:2001:db8::1]"),
        ("a" * 256, "192.0.2.1", "[192.0.2.1]"),
    ],
)
def test_ehlo_name_is_the_client_helo_when_safe(helo: str | None, ip: str, expected: str) -> None:
    assert ehlo_name(ClientFacts(ip=ip, helo=helo, rdns=None, esmtp=True)) == expected
