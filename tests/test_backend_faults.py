"""Fault injection at the backend: the client gets the right 4xx, nothing is lost, service recovers."""

from __future__ import annotations

import pytest

from tests.faultybackend import FaultyBackend
from tests.smtpclient import RawClient, make_message

FAULTS = {
    # fault: (client reply code, enhanced prefix, backend error kind counted, backend may hold the message)
    "no_greeting": (451, "4.4.1", "connect", False),
    "greet_421": (451, "4.4.1", "connect", False),
    "garbage_greeting": (451, "4.4.1", "connect", False),
    "bad_starttls": (451, "4.3.0", "tls", False),
    "drop_after_mail": (451, "4.4.2", "disconnected", False),
    "stall_mail": (451, "4.4.2", "timeout", False),
    "drop_after_rcpt": (451, "4.4.2", "disconnected", False),
    "garbage_reply_rcpt": (451, "4.3.0", "protocol", False),
    "drop_in_data": (451, "4.4.2", "disconnected", False),
    # The one case SMTP cannot close: the backend took it, its reply never came.
    # The client is told 4xx and will retry (a duplicate, never a loss).
    "drop_after_dot": (451, "4.4.2", "disconnected", True),
    "stall_after_dot": (451, "4.4.2", "timeout", True),
}


async def _send(proxy) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    async with RawClient(proxy.host, proxy.port, timeout=15) as c:
        await c.connect()
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
        return r.code, r.text


@pytest.mark.parametrize("fault", sorted(FAULTS))
async def test_backend_fault_gives_4xx_and_recovers(fault: str, start_proxy) -> None:
    code, enhanced, kind, may_hold = FAULTS[fault]
    backend = FaultyBackend(fault, stall=3.0)
    await backend.start()
    try:
        proxy = await start_proxy(
            {"backend_options": {"connect_timeout": 0.5, "command_timeout": 0.5, "data_timeout": 0.5}},
            backend_port=backend.port,
        )
        got_code, text = await _send(proxy)
        assert (got_code, text[:5]) == (code, enhanced), text
        assert len(backend.delivered) == (1 if may_hold else 0)
        errors = proxy.app.metrics.backend_errors.labels(kind)._value.get()
        assert errors >= 1, f"smtpproxy_backend_errors_total{{kind={kind}}} did not move"
        backend.fault = "none"
        got_code, text = await _send(proxy)
        assert got_code == 250, text
        assert len(backend.delivered) == (2 if may_hold else 1)
    finally:
        await backend.stop()


async def test_slow_backend_applies_back_pressure_with_a_bounded_pool(start_proxy) -> None:
    """pool_size bounds backend connections: extra transactions wait, then get 451 4.3.0, never pile up."""
    import asyncio

    backend = FaultyBackend("stall_mail", stall=2.0)
    await backend.start()
    try:
        proxy = await start_proxy(
            {"backend_options": {"pool_size": 2, "connect_timeout": 0.5, "command_timeout": 5}},
            backend_port=backend.port,
        )

        async def mail() -> int:
            async with RawClient(proxy.host, proxy.port, timeout=15) as c:
                await c.connect()
                await c.cmd("EHLO client.test")
                return (await c.cmd("MAIL FROM:<s@sender.example>")).code

        codes = await asyncio.gather(*(mail() for _ in range(5)))
        assert sorted(codes) == [250, 250, 451, 451, 451]
        assert proxy.app.metrics.backend_errors.labels("pool_exhausted")._value.get() == 3
        assert proxy.app.backend._open <= 2  # type: ignore[attr-defined]
    finally:
        await backend.stop()
