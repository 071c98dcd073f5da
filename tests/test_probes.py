"""Probes (connect and close at once: nc -z, tcpSocket health checks, port scanners) free their slot at once."""

from __future__ import annotations

import asyncio
import socket
import ssl
import struct
import time
from pathlib import Path

import trustme

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message

PROBES = 3000


def _probes(host: str, port: int, count: int, *, batch: int = 50) -> float:
    """``count`` probes, half FIN and half RST; opened ``batch`` at a time, then all closed at once
    (so some close before the server ran anything for them, some after the banner)."""
    started = time.monotonic()
    for first in range(0, count, batch):
        socks = [socket.create_connection((host, port), timeout=10) for _ in range(min(batch, count - first))]
        for i, sock in enumerate(socks):
            if i % 2:
                # SO_LINGER 0: close() sends RST instead of FIN.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.close()
    return time.monotonic() - started


async def _active_back_to(app, baseline: int, within: float) -> float:
    """Seconds until ``app.connections`` is back to ``baseline`` (fails after ``within``)."""
    started = time.monotonic()
    while len(app.connections) > baseline:
        assert time.monotonic() - started < within, f"{len(app.connections)} connections still counted"
        await asyncio.sleep(0.01)
    settled = time.monotonic() - started
    # Probes still in the listen backlog are accepted (and closed) a moment later:
    # wait until none is left before a real client comes.
    for _ in range(3):
        await asyncio.sleep(0.1)
        while len(app.connections) > baseline:
            assert time.monotonic() - started < within, f"{len(app.connections)} connections still counted"
            await asyncio.sleep(0.01)
    return settled


async def _served(host: str, port: int, backend: RecordingBackend) -> None:
    before = len(backend.messages)
    async with RawClient(host, port) as c:
        assert (await c.connect()).code == 220
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
        assert r.code == 250
    assert len(backend.messages) == before + 1


async def test_thousands_of_fin_and_rst_probes_free_their_slots_at_once(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy({"limits": {"max_connections": 100}})
    loop = asyncio.get_running_loop()
    took = await loop.run_in_executor(None, _probes, proxy.host, proxy.port, PROBES)
    settled = await _active_back_to(proxy.app, 0, within=5.0)
    print(f"{PROBES} probes in {took:.2f} s, connections back to baseline {settled:.3f} s later")
    assert proxy.app.metrics.connections_active._value.get() == 0
    await _served(proxy.host, proxy.port, backend)


async def test_probes_during_a_slow_connect_check_free_their_slots(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    # A DNSBL rule against a nameserver that never answers: every connect stage
    # waits for the DNS timeout while the probes are long gone.
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    rules = tmp_path / "slow-rules"
    rules.mkdir()
    (rules / "10-dnsbl.yaml").write_text(
        "- name: listed\n  stage: connect\n  if: {dnsbl: zen.test}\n  then: reject\n"
    )
    try:
        proxy = await start_proxy(
            {
                "rules": str(rules),
                "limits": {"max_connections": 50},
                "dns": {"nameservers": [f"127.0.0.1:{silent.getsockname()[1]}"], "timeout": 3.0},
            }
        )
        loop = asyncio.get_running_loop()
        took = await loop.run_in_executor(None, _probes, proxy.host, proxy.port, 500)
        settled = await _active_back_to(proxy.app, 0, within=2.0)
        print(f"500 probes during a 3 s connect check in {took:.2f} s, baseline {settled:.3f} s later")
    finally:
        silent.close()


async def test_five_probes_do_not_lock_out_senders_at_max_connections_5(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy({"limits": {"max_connections": 5}})
    loop = asyncio.get_running_loop()
    for _ in range(3):
        await loop.run_in_executor(None, _probes, proxy.host, proxy.port, 5)
        await _active_back_to(proxy.app, 0, within=2.0)
        await _served(proxy.host, proxy.port, backend)
    assert proxy.app.metrics.connections_rejected.labels("max_connections")._value.get() == 0


async def test_probes_waiting_for_a_proxy_header_free_their_slots(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy(
        {"limits": {"max_connections": 50}, "proxy_protocol": {"trusted_networks": ["127.0.0.0/8"]}}
    )
    loop = asyncio.get_running_loop()
    took = await loop.run_in_executor(None, _probes, proxy.host, proxy.port, 500)
    settled = await _active_back_to(proxy.app, 0, within=2.0)
    print(f"500 probes before a PROXY header in {took:.2f} s, baseline {settled:.3f} s later")
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"PROXY TCP4 192.0.2.7 127.0.0.1 40000 25\r\n")
    line = await asyncio.wait_for(reader.readline(), 10)
    assert line.startswith(b"220 "), line
    writer.close()


async def test_probes_with_a_connect_rate_limit_free_their_slots(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy(
        {
            "limits": {"max_connections": 50},
            "ratelimits": [{"name": "conn_rate", "key": "client_ip", "rate": "100000/minute"}],
        }
    )
    loop = asyncio.get_running_loop()
    took = await loop.run_in_executor(None, _probes, proxy.host, proxy.port, 1000)
    settled = await _active_back_to(proxy.app, 0, within=2.0)
    print(f"1000 probes with a connect rate limit in {took:.2f} s, baseline {settled:.3f} s later")
    await _served(proxy.host, proxy.port, backend)


# Where a client may vanish: the bytes it sends (after the banner) before it closes.
_DIALOGUE_POINTS = {
    "after_banner": b"",
    "mid_command": b"EHLO half-a-li",
    "after_ehlo": b"EHLO c.test\r\n",
    "mid_data": b"EHLO c.test\r\nMAIL FROM:<s@sender.example>\r\nRCPT TO:<user@example.org>\r\n"
    b"DATA\r\nSubject: cut\r\n\r\nhalf a bo",
    "after_starttls_220": b"EHLO c.test\r\nSTARTTLS\r\n",
}


async def test_a_client_closing_at_any_point_of_the_dialogue_frees_its_slot(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("mx.test.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    proxy = await start_proxy(
        {"limits": {"max_connections": 5}, "tls": {"cert": "cert.pem", "key": "key.pem"}}
    )
    for rst in (False, True):
        for point, data in _DIALOGUE_POINTS.items():
            for _ in range(6):  # more than max_connections: a stuck slot would lock the next out
                reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
                assert (await asyncio.wait_for(reader.readline(), 10)).startswith(b"220 "), point
                writer.write(data)
                await writer.drain()
                await asyncio.sleep(0.02)
                if rst:
                    sock = writer.get_extra_info("socket")
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.close()
                await _active_back_to(proxy.app, 0, within=2.0)
        # Inside TLS, then gone.
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            await c.cmd("EHLO c.test")
            assert (await c.cmd("STARTTLS")).code == 220
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            assert c.writer is not None
            await c.writer.start_tls(ctx, server_hostname="mx.test.example")
            assert (await c.cmd("EHLO c.test")).code == 250
        await _active_back_to(proxy.app, 0, within=2.0)
    await _served(proxy.host, proxy.port, backend)
