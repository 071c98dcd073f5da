"""Small protocol holes: NUL bytes in DATA, STARTTLS inside TLS, junk commands, one address's connections."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import trustme

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message


async def _start_message(c: RawClient) -> None:
    assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
    assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
    assert (await c.cmd("DATA")).code == 354


async def _served(proxy, backend: RecordingBackend) -> None:
    before = len(backend.messages)
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
        assert r.code == 250, r
    assert len(backend.messages) == before + 1


# -- NUL bytes ----------------------------------------------------------------------


async def test_nul_byte_in_data_is_refused_with_554_5_6_0_and_the_session_goes_on(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO c.test")
        await _start_message(c)
        # A backend that strips NULs would read "\r\n\0.\r\n" as the end of data.
        r = await c.cmd(b"Subject: one\r\n\r\nfirst\r\n\x00.\r\nMAIL FROM:<x@sender.example>\r\n.")
        assert (r.code, r.text) == (554, "5.6.0 Message contains NUL characters")
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message("after"))
        assert r.code == 250
    assert len(backend.messages) == 1 and b"Subject: after" in backend.messages[0].content
    assert not any(b"\x00" in m.content for m in backend.messages)
    await _served(proxy, backend)


# -- STARTTLS inside TLS --------------------------------------------------------------


async def test_starttls_inside_tls_is_503_and_the_session_goes_on(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    proxy = await start_proxy({"tls": {"cert": "cert.pem", "key": "key.pem"}})
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO c.test")
        assert (await c.cmd("STARTTLS")).code == 220
        assert c.writer is not None
        await c.writer.start_tls(ctx, server_hostname="mx.test.example")
        ehlo = await c.cmd("EHLO c.test")
        assert ehlo.code == 250 and "STARTTLS" not in ehlo.lines
        r = await c.cmd("STARTTLS")
        assert (r.code, r.text) == (503, "5.5.1 Already running TLS")
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
        assert r.code == 250
    assert b"with ESMTPS" in backend.messages[0].content
    await _served(proxy, backend)


# -- junk commands ----------------------------------------------------------------------


async def test_junk_commands_past_the_limit_get_421_and_close(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO c.test")
        kinds = ["NOOP", "RSET", "VRFY <user@example.org>", "HELP", "EHLO again.test"]
        for i in range(100):
            r = await c.cmd(kinds[i % len(kinds)])
            assert r.code in (250, 252), (i, r)
        r = await c.cmd("NOOP")
        assert (r.code, r.text) == (421, "4.7.0 Too many junk commands, closing")
        assert await c.closed()
    hits = proxy.app.metrics.session_limit_hits.labels(limit="max_junk_commands")._value.get()
    assert hits == 1
    await _served(proxy, backend)


async def test_expn_counts_as_junk(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"session_limits": {"max_junk_commands": 2}})
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.cmd("EXPN staff")).code == 502
        assert (await c.cmd("EXPN staff")).code == 502
        assert (await c.cmd("EXPN staff")).code == 421
    await _served(proxy, backend)


async def test_a_delivery_starts_the_junk_count_again(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"session_limits": {"max_junk_commands": 5}})
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        for _ in range(3):
            # Four NOOPs and (from the second round) a repeated EHLO: five junk
            # commands per round, fifteen in all, allowed because each delivery
            # starts the count again.
            for _ in range(4):
                assert (await c.cmd("NOOP")).code == 250
            r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
            assert r.code == 250
        for _ in range(5):
            assert (await c.cmd("NOOP")).code == 250
        assert (await c.cmd("NOOP")).code == 421
    assert len(backend.messages) == 3


async def test_the_first_ehlo_after_starttls_is_not_junk(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    proxy = await start_proxy(
        {"tls": {"cert": "cert.pem", "key": "key.pem"}, "session_limits": {"max_junk_commands": 1}}
    )
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO c.test")
        assert (await c.cmd("STARTTLS")).code == 220
        assert c.writer is not None
        await c.writer.start_tls(ctx, server_hostname="mx.test.example")
        assert (await c.cmd("EHLO c.test")).code == 250
        assert (await c.cmd("NOOP")).code == 250
        assert (await c.cmd("EHLO c.test")).code == 421


# -- connections per client address ----------------------------------------------------------


def _rejected(proxy, reason: str) -> float:
    return float(proxy.app.metrics.connections_rejected.labels(reason)._value.get())


async def test_one_address_holds_at_most_max_connections_per_ip(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()  # the default: 50
    held: list[RawClient] = []
    try:
        for _ in range(50):
            c = RawClient(proxy.host, proxy.port)
            assert (await c.connect()).code == 220
            held.append(c)
        async with RawClient(proxy.host, proxy.port) as c:
            r = await c.connect()
            assert (r.code, r.text) == (421, "4.7.0 Too many connections from your address, try again later")
            assert await c.closed()
        assert _rejected(proxy, "max_connections_per_ip") == 1
        await held.pop().close()
        await asyncio.sleep(0.1)
        await _served(proxy, backend)
    finally:
        for c in held:
            await c.close()


async def test_max_connections_per_ip_counts_the_proxy_protocol_client(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy(
        {"limits": {"max_connections_per_ip": 2}, "proxy_protocol": {"trusted_networks": ["127.0.0.0/8"]}}
    )

    async def via_balancer(client: str) -> tuple[RawClient, int]:
        c = RawClient(proxy.host, proxy.port)
        c.reader, c.writer = await asyncio.open_connection(proxy.host, proxy.port)
        await c.send(f"PROXY TCP4 {client} 127.0.0.1 40000 25\r\n".encode())
        return c, (await c.reply()).code

    held = []
    try:
        for _ in range(2):
            c, code = await via_balancer("192.0.2.7")
            held.append(c)
            assert code == 220
        c, code = await via_balancer("192.0.2.7")
        held.append(c)
        assert code == 421
        c, code = await via_balancer("192.0.2.8")  # another client behind the same balancer
        held.append(c)
        assert code == 220
    finally:
        for c in held:
            await c.close()


async def test_max_connections_per_ip_null_turns_it_off(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"limits": {"max_connections_per_ip": None}})
    held = []
    try:
        for _ in range(60):
            c = RawClient(proxy.host, proxy.port)
            assert (await c.connect()).code == 220
            held.append(c)
    finally:
        for c in held:
            await c.close()
