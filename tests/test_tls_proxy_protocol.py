"""STARTTLS inbound and to the backend, and the PROXY protocol from trusted balancers only."""

from __future__ import annotations

import asyncio
import socket
import ssl
import warnings
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def server_cert(ca: trustme.CA, tmp_path: Path) -> tuple[str, str]:
    cert = ca.issue_cert("mx.test.example", "127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


async def _starttls(c: RawClient, ca: trustme.CA) -> None:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    assert c.writer is not None
    await c.writer.start_tls(ctx, server_hostname="mx.test.example")


async def test_starttls_inbound_offered_and_recorded_in_received(
    backend: RecordingBackend, start_proxy, server_cert: tuple[str, str], ca: trustme.CA
) -> None:
    cert, key = server_cert
    proxy = await start_proxy({"tls": {"cert": cert, "key": key}})
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        ehlo = await c.cmd("EHLO client.test")
        assert "STARTTLS" in ehlo.lines
        assert (await c.cmd("STARTTLS")).code == 220
        await _starttls(c, ca)
        ehlo = await c.cmd("EHLO client.test")
        assert "STARTTLS" not in ehlo.lines
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    received = backend.messages[0].content.split(b"\r\nDate:")[0]
    assert b"with ESMTPS id" in received and b"(using TLSv1." in received


async def test_tls_below_1_2_is_refused(
    backend: RecordingBackend, start_proxy, server_cert: tuple[str, str]
) -> None:
    cert, key = server_cert
    proxy = await start_proxy({"tls": {"cert": cert, "key": key}})
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        assert (await c.cmd("STARTTLS")).code == 220
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        # Whether this OpenSSL refuses to offer TLS 1.1 itself or our server
        # refuses it, the handshake must fail: either way no session below 1.2.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
        assert c.writer is not None
        with pytest.raises((ssl.SSLError, ConnectionError, OSError)):
            await asyncio.wait_for(c.writer.start_tls(ctx, server_hostname="mx.test.example"), 5)


async def test_starttls_to_backend_when_offered(
    start_proxy, server_cert: tuple[str, str], ca: trustme.CA
) -> None:
    cert, key = server_cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    tls_backend = RecordingBackend(tls_context=ctx)
    await tls_backend.start()
    try:
        proxy = await start_proxy(backend_port=tls_backend.port)
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message())
            ).code == 250
        assert len(tls_backend.messages) == 1
        # The backend session ran over TLS: the pooled connection has an SSL object.
        conn = proxy.app.backend._idle[0]  # type: ignore[attr-defined]
        assert conn.client.get_transport_info("sslcontext") is not None
    finally:
        await tls_backend.stop()


async def test_backend_tls_verify_refuses_untrusted_certificate(
    start_proxy, server_cert: tuple[str, str]
) -> None:
    cert, key = server_cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    tls_backend = RecordingBackend(tls_context=ctx)
    await tls_backend.start()
    try:
        proxy = await start_proxy({"backend_options": {"tls_verify": True}}, backend_port=tls_backend.port)
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            await c.cmd("EHLO client.test")
            r = await c.cmd("MAIL FROM:<s@sender.example>")
            assert r.code == 451 and r.text.startswith("4.3.0")
        assert tls_backend.messages == []
    finally:
        await tls_backend.stop()


async def test_proxy_protocol_v1_from_trusted_network_sets_client_ip(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy({"proxy_protocol": {"trusted_networks": ["127.0.0.0/8"]}})
    async with RawClient(proxy.host, proxy.port) as c:
        assert c.writer is None
        c.reader, c.writer = await asyncio.open_connection(proxy.host, proxy.port)
        await c.send(b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n")
        assert (await c.reply()).code == 220
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    assert b"[203.0.113.7]" in backend.messages[0].content.split(b"\r\n")[0]


async def test_proxy_protocol_v2_from_trusted_network(backend: RecordingBackend, start_proxy) -> None:
    import socket
    import struct

    proxy = await start_proxy({"proxy_protocol": {"trusted_networks": ["127.0.0.1/32"]}})
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    addrs = socket.inet_pton(socket.AF_INET6, "2001:db8::5") + socket.inet_pton(
        socket.AF_INET6, "2001:db8::1"
    )
    addrs += struct.pack("!HH", 50000, 25)
    header = sig + bytes([0x21, 0x21]) + struct.pack("!H", len(addrs)) + addrs
    async with RawClient(proxy.host, proxy.port) as c:
        c.reader, c.writer = await asyncio.open_connection(proxy.host, proxy.port)
        await c.send(header)
        assert (await c.reply()).code == 220
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    assert b"[IPv6:2001:db8::5]" in backend.messages[0].content.split(b"\r\n")[0]


async def test_proxy_header_from_untrusted_client_is_not_honoured(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy({"proxy_protocol": {"trusted_networks": ["192.0.2.0/24"]}})
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220
        r = await c.cmd("PROXY TCP4 203.0.113.7 192.0.2.1 40000 25")
        assert r.code == 500
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    assert b"[127.0.0.1]" in backend.messages[0].content.split(b"\r\n")[0]


async def test_garbage_proxy_header_from_trusted_peer_closes(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"proxy_protocol": {"trusted_networks": ["127.0.0.0/8"], "timeout": 1.0}})
    c = RawClient(proxy.host, proxy.port)
    c.reader, c.writer = await asyncio.open_connection(proxy.host, proxy.port)
    await c.send(b"HELLO THERE\r\n")
    assert await c.closed()
    await c.close()


async def test_smtps_backend_uses_implicit_tls(start_proxy, server_cert: tuple[str, str]) -> None:
    cert, key = server_cert
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert, key)
    b = RecordingBackend()
    b._server = await asyncio.get_running_loop().create_server(b._factory, "127.0.0.1", 0, ssl=ctx)
    b.port = b._server.sockets[0].getsockname()[1]
    try:
        proxy = await start_proxy({"backend": f"smtps://127.0.0.1:{b.port}"})
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message())
            ).code == 250
        assert len(b.messages) == 1
    finally:
        await b.stop()


def _handshake_failures(proxy: Any, reason: str) -> float:
    sample = proxy.app.metrics.registry.get_sample_value
    return float(sample("smtpproxy_tls_handshake_failures_total", {"reason": reason}) or 0.0)


async def _after_starttls(proxy: Any) -> RawClient:
    c = RawClient(proxy.host, proxy.port)
    await c.connect()
    await c.cmd("EHLO client.test")
    assert (await c.cmd("STARTTLS")).code == 220
    return c


def _blocking_starttls(host: str, port: int, ctx: ssl.SSLContext) -> None:
    with socket.create_connection((host, port), timeout=5) as sock:
        stream = sock.makefile("rb")
        for command in (b"", b"EHLO client.test\r\n", b"STARTTLS\r\n"):
            sock.sendall(command)
            while (line := stream.readline())[3:4] == b"-":
                pass
        assert line.startswith(b"220"), line
        ctx.wrap_socket(sock, server_hostname="mx.test.example").close()


async def _wait_counted(proxy: Any, reason: str) -> None:
    for _ in range(100):  # bounded: the server notices the failure within milliseconds
        if _handshake_failures(proxy, reason) == 1:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"no handshake failure counted as {reason}")


async def _still_serving(proxy: Any, backend: RecordingBackend) -> None:
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250


async def test_failed_handshakes_counted_by_reason(
    backend: RecordingBackend, start_proxy, server_cert: tuple[str, str], ca: trustme.CA
) -> None:
    cert, key = server_cert
    proxy = await start_proxy({"tls": {"cert": cert, "key": key, "min_version": "TLSv1.3"}})

    # A client that stops at TLS 1.2 while we require 1.3.
    c = await _after_starttls(proxy)
    old = ssl.create_default_context()
    ca.configure_trust(old)
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    assert c.writer is not None
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(c.writer.start_tls(old, server_hostname="mx.test.example"), 5)
    await c.close()
    await _wait_counted(proxy, "protocol_version")

    # A client that does not trust our certificate (another CA): a blocking
    # socket, as asyncio's TLS drops the connection without sending the alert.
    distrusting = ssl.create_default_context()
    trustme.CA().configure_trust(distrusting)
    with pytest.raises(ssl.SSLCertVerificationError):
        await asyncio.to_thread(_blocking_starttls, proxy.host, proxy.port, distrusting)
    await _wait_counted(proxy, "certificate")

    # A client that goes on in plain text after our 220.
    c = await _after_starttls(proxy)
    assert c.writer is not None
    c.writer.write(b"EHLO client.test\r\n")
    await c.writer.drain()
    await _wait_counted(proxy, "not_tls")
    await c.close()

    # A client that leaves before its ClientHello.
    c = await _after_starttls(proxy)
    await c.close()
    await _wait_counted(proxy, "closed")

    await _still_serving(proxy, backend)
    assert _handshake_failures(proxy, "other") == 0
    internal = {"kind": "internal"}
    assert not proxy.app.metrics.registry.get_sample_value("smtpproxy_protocol_errors_total", internal)
    assert len(backend.messages) == 1


def test_handshake_failure_reasons_for_other_errors() -> None:
    from smtpproxy.tls import HANDSHAKE_FAILURE_REASONS, handshake_failure_reason

    no_cipher = ssl.SSLError(1, "no shared cipher")
    no_cipher.reason = "NO_SHARED_CIPHER"
    assert handshake_failure_reason(no_cipher) == "no_shared_cipher"
    assert handshake_failure_reason(TimeoutError()) == "timeout"
    assert handshake_failure_reason(ssl.SSLEOFError(8, "EOF")) == "closed"
    assert handshake_failure_reason(ValueError("odd")) == "other"
    assert handshake_failure_reason(None) == "other"
    words = {handshake_failure_reason(e) for e in (no_cipher, TimeoutError(), None, ConnectionResetError())}
    assert words <= set(HANDSHAKE_FAILURE_REASONS)


def _shipped_rule_folder(tmp_path: Path, name: str) -> Path:
    """A rules folder holding one of the shipped rule files."""
    rules = tmp_path / "rules"
    rules.mkdir()
    shipped = Path(__file__).resolve().parent.parent / "smtpproxy" / "data" / "rules" / name
    (rules / name).write_text(shipped.read_text())
    return rules


async def test_helo_rules_score_once_per_session_across_starttls(
    backend: RecordingBackend, start_proxy, server_cert: tuple[str, str], ca: trustme.CA, tmp_path: Path
) -> None:
    """A greeting is judged once: the EHLO after STARTTLS replaces the first one's score."""
    rules = _shipped_rule_folder(tmp_path, "30-helo.yaml")
    cert, key = server_cert
    quiet = {name: {"enabled": False} for name in ("spf", "dkim", "arc", "dmarc")}
    proxy = await start_proxy(
        {"tls": {"cert": cert, "key": key}, "rules": str(rules), "scores": {"add_header": 0.5}, **quiet}
    )
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO DESKTOP-4F2A")
        assert (await c.cmd("STARTTLS")).code == 220
        await _starttls(c, ca)
        await c.cmd("EHLO DESKTOP-4F2A")
        # Greeting again without TLS in between: still once.
        reply = await c.send_message(
            "s@sender.example", ["user@example.org"], make_message(), helo="DESKTOP-4F2A"
        )
        assert reply.code == 250
    content = backend.messages[0].content
    assert b"X-Spam-Score: 1.5\r\n" in content, content[:600]
