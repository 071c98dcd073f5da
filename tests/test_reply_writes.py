"""Replies go out in as few writes as the dialogue allows: one per EHLO, one per pipelined group."""

from __future__ import annotations

import asyncio
from typing import Any

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message


async def _count_writes(proxy: Any) -> list[bytes]:
    """The server's writes on the (one) client connection, recorded on its real socket transport."""
    for _ in range(200):
        if proxy.app.connections:
            break
        await asyncio.sleep(0.01)
    (conn,) = proxy.app.connections
    transport = conn.transport
    writes: list[bytes] = []
    real_write = transport.write

    def write(data: bytes) -> None:
        writes.append(bytes(data))
        real_write(data)

    transport.write = write
    return writes


async def test_the_ehlo_reply_is_one_write(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        writes = await _count_writes(proxy)
        r = await c.cmd("EHLO client.test")
        assert r.code == 250 and "PIPELINING" in r.lines and len(r.lines) >= 6
        assert len(writes) == 1 and writes[0].count(b"\r\n") == len(r.lines)


async def test_replies_to_a_pipelined_group_are_one_write(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        writes = await _count_writes(proxy)
        await c.send(
            b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<user@example.org>\r\n"
            b"RCPT TO:<other@example.org>\r\nDATA\r\n"
        )
        codes = [(await c.reply()).code for _ in range(4)]
        assert codes == [250, 250, 250, 354]
        assert len(writes) == 1
        assert (await c.cmd(make_message() + b".")).code == 250
        # An error is not held back: RCPT refused for relaying, then the rest.
        del writes[:]
        await c.send(b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<x@elsewhere.example>\r\nRSET\r\n")
        codes = [(await c.reply()).code for _ in range(3)]
        assert codes == [250, 550, 250]
        assert len(writes) == 2  # 250+550 (the error flushes), then 250
    assert len(backend.messages) == 1


async def test_pipelined_quit_gets_every_reply_before_the_close(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.send(b"EHLO client.test\r\nNOOP\r\nRSET\r\nQUIT\r\n")
        assert (await c.reply()).code == 250
        assert [(await c.reply()).code for _ in range(3)] == [250, 250, 221]
        assert await c.closed()
