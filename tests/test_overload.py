"""Overload: thousands of idle or trickling connections do not stop normal senders; caps answer 421."""

from __future__ import annotations

import asyncio

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message

IDLE = 2000


async def test_2000_idle_and_trickling_connections_while_senders_get_service(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy(
        {"limits": {"max_connections": IDLE + 100, "idle_timeout": 60, "max_connections_per_ip": None}}
    )
    held: list[asyncio.StreamWriter] = []
    try:
        for i in range(IDLE):
            _reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
            held.append(writer)
            if i % 2:
                writer.write(b"EHLO slow")  # a slowloris: a command that never ends
        await asyncio.sleep(0.2)
        assert proxy.app.metrics.connections_active._value.get() >= IDLE
        for _ in range(20):
            async with RawClient(proxy.host, proxy.port) as c:
                assert (await c.connect()).code == 220
                r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
                assert r.code == 250
        assert len(backend.messages) == 20
    finally:
        for writer in held:
            writer.close()


async def test_global_connection_cap_answers_421_and_frees_up(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"limits": {"max_connections": 5}})
    held = [await asyncio.open_connection(proxy.host, proxy.port) for _ in range(5)]
    await asyncio.sleep(0.05)
    async with RawClient(proxy.host, proxy.port) as c:
        r = await c.connect()
        assert r.code == 421 and r.text.startswith("4.7.0")
    for _, writer in held:
        writer.close()
    await asyncio.sleep(0.1)
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220


async def test_per_ip_concurrency_cap_answers_421(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"ratelimits": [{"name": "per_ip", "key": "client_ip", "concurrency": 3}]})
    held = []
    for _ in range(3):
        c = RawClient(proxy.host, proxy.port)
        assert (await c.connect()).code == 220
        held.append(c)
    c = RawClient(proxy.host, proxy.port)
    r = await c.connect()
    assert r.code == 421 and r.text.startswith("4.7.0") and "per_ip" in r.text
    await c.close()
    for h in held:
        await h.close()
