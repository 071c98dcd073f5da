"""Security properties: no open relay, no header injection, TLS certificate reload and expiry."""

from __future__ import annotations

import asyncio
import datetime
import ssl
from pathlib import Path

import trustme

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message


async def test_helo_and_addresses_cannot_inject_header_fields(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        # HELO with characters that would fake comments or fields in Received.
        assert (await c.cmd("EHLO evil(by x)\tX-Injected:yes")).code == 250
        assert (await c.cmd('MAIL FROM:<"a\\\\\tb"@sender.example>')).code in (250, 501, 553)
        await c.cmd("RSET")
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
        await c.cmd("DATA")
        assert (await c.cmd(make_message() + b".")).code == 250
    lines = backend.messages[0].content.split(b"\r\n")
    assert lines[0].startswith(b"Received: from evil?by?x??X-Injected:yes (")
    # The field's other lines are folded continuations; no line starts a new field of the client's making.
    assert lines[1].startswith(b"\tby mx.test.example")
    assert not any(line.startswith(b"X-Injected") for line in lines)


async def test_source_routed_and_literal_recipients_are_not_relayed(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<s@sender.example>")
        for rcpt in (
            "<@example.org:victim@elsewhere.example>",
            "<victim%elsewhere.example@example.org.evil>",
            "<victim@[192.0.2.1]>",
            "<victim@example.org.elsewhere.example>",
            "<victim>",
        ):
            r = await c.cmd(f"RCPT TO:{rcpt}")
            assert r.code >= 500, (rcpt, r)
    assert not any(cmd.startswith("RCPT") for cmd in backend.commands)


def _write_cert(ca: trustme.CA, directory: Path, days: int) -> tuple[Path, Path]:
    not_after = datetime.datetime.now(datetime.UTC) + datetime.timedelta(days=days)
    cert = ca.issue_cert("mx.test.example", not_after=not_after)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return cert_path, key_path


async def _peer_cert_not_after(host: str, port: int, ca: trustme.CA) -> str:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with RawClient(host, port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        assert (await c.cmd("STARTTLS")).code == 220
        assert c.writer is not None
        await c.writer.start_tls(ctx, server_hostname="mx.test.example")
        ssl_object = c.writer.get_extra_info("ssl_object")
        return str(ssl_object.getpeercert()["notAfter"])


async def test_certificate_reloads_on_sighup_and_expiry_is_exported(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert, key = _write_cert(ca, tmp_path, days=10)
    proxy = await start_proxy({"tls": {"cert": str(cert), "key": str(key)}})
    first_expiry = proxy.app.metrics.tls_cert_expiry._value.get()
    assert 9 * 86400 < first_expiry - datetime.datetime.now().timestamp() < 11 * 86400
    before = await _peer_cert_not_after(proxy.host, proxy.port, ca)
    _write_cert(ca, tmp_path, days=100)
    proxy.app.reload()  # what SIGHUP calls
    after = await _peer_cert_not_after(proxy.host, proxy.port, ca)
    assert before != after
    assert proxy.app.metrics.tls_cert_expiry._value.get() > first_expiry + 80 * 86400
    # A broken certificate file at reload keeps the old one in service.
    cert.write_text("not a certificate")
    proxy.app.reload()
    assert await _peer_cert_not_after(proxy.host, proxy.port, ca) == after
    await asyncio.sleep(0)


async def test_control_characters_in_addresses_are_refused_permanently(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        r = await c.cmd('MAIL FROM:<"a\\\\\tb"@sender.example>')
        assert (r.code, r.text[:5]) == (553, "5.1.7")
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        r = await c.cmd('RCPT TO:<"x\x7fy"@example.org>')
        assert (r.code, r.text[:5]) == (553, "5.1.3")
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
