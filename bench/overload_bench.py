#!/usr/bin/env python3
"""Overload: normal senders' latency with thousands of idle or trickling connections held open.

    .venv/bin/python bench/overload_bench.py [--idle 2000] [--messages 400] [--sessions 10]

Measures the p50/p99 session latency of normal senders (2 KB messages, one
connection each) against a proxy process, first unloaded, then while ``--idle``
connections sit open (half idle after the banner, half trickling a command one
byte per second: slowloris). Prints both and the ratio p99 loaded / unloaded
(the target is within 3x), plus the proxy's RSS with the connections held.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.core_bench import BODY_2K, _builtin_sink, builtin_load, pct, peak_rss_kb  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.procs import ProxyProcess, free_port  # noqa: E402


async def hold(port: int, count: int, stop: asyncio.Event) -> None:
    """Open ``count`` connections; every other one trickles a byte a second until ``stop``."""
    writers = []
    for i in range(count):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writers.append((i % 2 == 1, writer))
    payload = b"EHLO slowloris.example"
    step = 0
    while not stop.is_set():
        for trickle, writer in writers:
            if trickle and step < len(payload):
                writer.write(payload[step : step + 1])
        step += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 1.0)
    for _, writer in writers:
        writer.close()


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--idle", type=int, default=2000)
    ap.add_argument("--messages", type=int, default=400)
    ap.add_argument("--sessions", type=int, default=10)
    args = ap.parse_args()
    dns = DnsServer({})
    dns.start()
    sink_port = free_port()
    sink = await _builtin_sink(sink_port)
    proxy = ProxyProcess(
        Path(tempfile.mkdtemp(prefix="smtpproxy-overload-")),
        {
            "backend": f"smtp://127.0.0.1:{sink_port}",
            "relay_domains": ["example.org"],
            "dns": {"nameservers": [dns.address], "reverse_lookup": False},
            "limits": {
                "max_connections": args.idle + 500,
                "idle_timeout": 300,
                "max_connections_per_ip": None,  # all load is from 127.0.0.1
            },
            "log": {"level": "warning"},
        },
    ).start()
    assert proxy.proc is not None
    try:
        await builtin_load(proxy.port, 50, args.sessions, BODY_2K)  # warm up
        _, quiet = await builtin_load(proxy.port, args.messages, args.sessions, BODY_2K)
        stop = asyncio.Event()
        holder = asyncio.create_task(hold(proxy.port, args.idle, stop))
        await asyncio.sleep(3)
        _, loaded = await builtin_load(proxy.port, args.messages, args.sessions, BODY_2K)
        rss = peak_rss_kb(proxy.proc.pid)
        stop.set()
        await holder
    finally:
        proxy.stop()
        sink.close()
        dns.stop()
    result = {
        "held_connections": args.idle,
        "unloaded_ms": {"p50": round(pct(quiet, 0.5) * 1000, 2), "p99": round(pct(quiet, 0.99) * 1000, 2)},
        "loaded_ms": {"p50": round(pct(loaded, 0.5) * 1000, 2), "p99": round(pct(loaded, 0.99) * 1000, 2)},
        "p99_ratio": round(pct(loaded, 0.99) / pct(quiet, 0.99), 2),
        "peak_rss_mb": round(rss / 1024, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
