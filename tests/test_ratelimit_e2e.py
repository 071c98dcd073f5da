"""Rate and session limits through the running proxy, and two proxy processes sharing Redis."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from tests.backends import RecordingBackend
from tests.conftest import proxy_config
from tests.procs import ProxyProcess
from tests.redisserver import RedisServer, redis_server
from tests.smtpclient import RawClient, make_message

__all__ = ["redis_server"]  # the fixture, imported for pytest


# Authentication has nothing to say here (and no DNS to ask): keep the test about limits.
NO_AUTH: dict[str, Any] = {k: {"enabled": False} for k in ("spf", "dkim", "arc", "dmarc")}


async def connect(host: str, port: int) -> tuple[RawClient, int, str]:
    c = RawClient(host, port, timeout=10)
    banner = await c.connect()
    return c, banner.code, banner.text


async def test_connect_rate_gives_421_banner_and_close(backend: RecordingBackend, start_proxy: Any) -> None:
    limit = {"name": "conn_per_ip", "key": "client_ip", "rate": "60/hour", "burst": 2, "on": "connect"}
    proxy = await start_proxy({"ratelimits": [limit]})
    for _ in range(2):
        c, code, _ = await connect(proxy.host, proxy.port)
        assert code == 220
        await c.close()
    c, code, text = await connect(proxy.host, proxy.port)
    assert (code, text) == (421, "4.7.0 Rate limit conn_per_ip exceeded, try again later")
    assert await c.closed()
    await c.close()


async def test_mail_rate_gives_450_and_the_session_goes_on(
    backend: RecordingBackend, start_proxy: Any
) -> None:
    limit = {"name": "msgs_per_ip", "key": "client_net", "rate": "500/hour", "burst": 1, "on": "mail"}
    proxy = await start_proxy({"ratelimits": [limit]})
    c, _, _ = await connect(proxy.host, proxy.port)
    async with c:
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
        assert r.code == 250, r
        r = await c.cmd("MAIL FROM:<s@sender.example>")
        assert (r.code, r.text) == (450, "4.7.1 Rate limit msgs_per_ip exceeded, try again later")
        assert (await c.cmd("NOOP")).code == 250  # a transaction refusal keeps the connection
    assert len(backend.messages) == 1


async def test_rcpt_rate_gives_450_per_recipient(backend: RecordingBackend, start_proxy: Any) -> None:
    limit = {"name": "per_rcpt", "key": "recipient", "rate": "100/minute", "burst": 1, "on": "rcpt"}
    proxy = await start_proxy({"ratelimits": [limit]})
    c, _, _ = await connect(proxy.host, proxy.port)
    async with c:
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
        r = await c.cmd("RCPT TO:<user@example.org>")
        assert (r.code, r.text) == (450, "4.7.1 Rate limit per_rcpt exceeded, try again later")
        assert (await c.cmd("RCPT TO:<other@example.org>")).code == 250


async def test_concurrency_released_when_a_client_vanishes_without_quit(
    backend: RecordingBackend, start_proxy: Any
) -> None:
    proxy = await start_proxy({"ratelimits": [{"name": "concurrent", "key": "client_ip", "concurrency": 1}]})
    first, code, _ = await connect(proxy.host, proxy.port)
    assert code == 220
    second, code, text = await connect(proxy.host, proxy.port)
    assert (code, text) == (421, "4.7.0 Too many connections (concurrent), try again later")
    await second.close()
    assert first.writer is not None
    first.writer.transport.abort()  # gone: no QUIT, a reset
    for _ in range(200):  # bounded: up to 10 s for the server to notice the reset
        third, code, _ = await connect(proxy.host, proxy.port)
        await third.close()
        if code == 220:
            break
        await asyncio.sleep(0.05)
    assert code == 220


async def test_dictionary_attack_closed_with_421(backend: RecordingBackend, start_proxy: Any) -> None:
    proxy = await start_proxy({"session_limits": {"max_rejected_recipients": 2}})
    c, _, _ = await connect(proxy.host, proxy.port)
    async with c:
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        for i in range(2):
            assert (await c.cmd(f"RCPT TO:<u{i}@not-relayed.example>")).code == 550
        r = await c.cmd("RCPT TO:<u9@not-relayed.example>")
        assert (r.code, r.text) == (421, "4.7.0 Too many rejected recipients, closing")
        assert await c.closed()


async def send_messages(port: int, count: int) -> list[int]:
    """``count`` messages on one connection each; the reply code of each MAIL or DATA."""
    codes = []
    for _ in range(count):
        c, _, _ = await connect("127.0.0.1", port)
        async with c:
            r = await c.send_message("someone@flood.example", ["user@example.org"], make_message())
            codes.append(r.code)
            await c.cmd("QUIT")
    return codes


async def test_two_proxy_processes_sharing_redis_enforce_one_limit(
    backend: RecordingBackend, redis_server: RedisServer, tmp_path: Path
) -> None:
    limit = {"name": "msgs_per_domain", "key": "sender_domain", "rate": "10/day", "burst": 10, "on": "mail"}
    procs = []
    for name in ("a", "b"):
        folder = tmp_path / name
        folder.mkdir()
        overrides = {"ratelimits": [limit], "ratelimit_store": redis_server.url, **NO_AUTH}
        config = proxy_config(backend.port, overrides, folder)
        del config["listen"], config["metrics"]
        procs.append(ProxyProcess(folder, config).start())
    try:
        results = await asyncio.gather(*(send_messages(p.port, 8) for p in procs))
    finally:
        for p in procs:
            p.stop()
    codes = [code for result in results for code in result]
    assert codes.count(250) == 10 and codes.count(450) == 6, results
    assert len(backend.messages) == 10
