"""The budget of message bytes in flight: past it DATA gets 452 4.3.1, and the bytes come back however DATA ends."""

from __future__ import annotations

import asyncio
import time
import urllib.request

from prometheus_client import CollectorRegistry, Gauge

from smtpproxy.inflight import FLOOR, InflightBudget, default_budget
from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message

BUDGET = 100_000


async def _until(predicate, within: float = 5.0) -> None:
    started = time.monotonic()
    while not predicate():
        assert time.monotonic() - started < within
        await asyncio.sleep(0.01)


async def _gauge(metrics_url: str) -> float:
    """smtpproxy_inflight_bytes as /metrics shows it (fetched in a thread: the server is on this loop)."""

    def fetch() -> str:
        with urllib.request.urlopen(metrics_url + "/metrics", timeout=5) as response:
            return str(response.read().decode())

    text = await asyncio.get_running_loop().run_in_executor(None, fetch)
    (line,) = [x for x in text.splitlines() if x.startswith("smtpproxy_inflight_bytes ")]
    return float(line.split()[1])


async def _envelope(c: RawClient, mail: str = "MAIL FROM:<s@sender.example>") -> None:
    await c.connect()
    assert (await c.cmd("EHLO c.test")).code == 250
    assert (await c.cmd(mail)).code == 250
    assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250


async def test_past_the_budget_data_gets_452_and_the_bytes_come_back(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy({"limits": {"max_inflight_bytes": BUDGET}})
    budget = proxy.app.inflight
    holder = RawClient(proxy.host, proxy.port)
    await _envelope(holder)
    assert (await holder.cmd("DATA")).code == 354
    await holder.send(b"Subject: held\r\n\r\n" + (b"y" * 78 + b"\r\n") * 1000)  # 80 KB, no final dot
    await _until(lambda: budget.used >= 80_000)
    assert proxy.metrics_url is not None
    assert await _gauge(proxy.metrics_url) == budget.used

    # A declared size that cannot fit: refused before any content is sent.
    async with RawClient(proxy.host, proxy.port) as c:
        await _envelope(c, "MAIL FROM:<s@sender.example> SIZE=50000")
        r = await c.cmd("DATA")
        assert (r.code, r.text) == (452, "4.3.1 Insufficient system storage, try again later")
        # No declared size: the message crosses the budget as it arrives, and
        # is refused after its final dot; the session goes on.
        assert (await c.cmd("RSET")).code == 250
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        r = await c.cmd((b"z" * 78 + b"\r\n") * 600 + b".")
        assert (r.code, r.text) == (452, "4.3.1 Insufficient system storage, try again later")
        assert (await c.cmd("RSET")).code == 250
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message("small"))
        assert r.code == 250
    assert [b"Subject: small" in m.content for m in backend.messages] == [True]

    # The holder vanishes mid-DATA: its bytes are given back at once.
    await holder.close()
    await _until(lambda: budget.used == 0)
    assert await _gauge(proxy.metrics_url) == 0
    async with RawClient(proxy.host, proxy.port) as c:
        await _envelope(c, "MAIL FROM:<s@sender.example> SIZE=50000")
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(make_message("fits now") + (b"z" * 78 + b"\r\n") * 600 + b".")).code == 250
    assert budget.used == 0
    assert len(backend.messages) == 2


async def test_a_delivered_or_refused_message_gives_its_bytes_back(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy({"limits": {"max_inflight_bytes": BUDGET, "max_message_size": 50_000}})
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        for _ in range(5):  # five times the budget, one after the other
            r = await c.send_message(
                "s@sender.example",
                ["user@example.org"],
                make_message(body=("x" * 76 + "\r\n") * 500),
            )
            assert r.code == 250
            assert proxy.app.inflight.used == 0
        # Too big and NUL: refused, given back too.
        r = await c.send_message(
            "s@sender.example", ["user@example.org"], make_message(body=("x" * 76 + "\r\n") * 800)
        )
        assert r.code == 552 and proxy.app.inflight.used == 0
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message(body="a\x00b"))
        assert r.code == 554 and proxy.app.inflight.used == 0


def test_default_budget_is_an_eighth_of_memory_with_a_floor() -> None:
    assert default_budget() >= FLOOR
    gauge = Gauge("g", "g", registry=CollectorRegistry())
    budget = InflightBudget(10, gauge)
    ticket = budget.open(4)
    assert ticket is not None and budget.used == 4
    assert budget.open(7) is None and budget.used == 4
    assert ticket.need(3) and budget.used == 4  # within what it reserved
    assert ticket.need(10) and budget.used == 10
    assert not ticket.need(11) and budget.used == 10
    ticket.release()
    ticket.release()
    assert budget.used == 0
