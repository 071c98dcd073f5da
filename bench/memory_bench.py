#!/usr/bin/env python3
"""Memory: the proxy's peak RSS growth per byte of message in flight.

    .venv/bin/python bench/memory_bench.py [--sizes 1K,1M,24M] [--parallel 8] [--rounds 2]

For each message size, ``--parallel`` clients send one message each at the
same time through a fresh proxy process (shipped rules, SPF/DKIM/DMARC on, a DNS
server on loopback) to a sink (Postfix smtp-sink when installed, else a
built-in one). The proxy's peak RSS (VmHWM, reset before each round through
/proc/PID/clear_refs) minus its RSS before the round, divided by the bytes in
flight (parallel x size), is the ratio printed: 1.0 means each message is
held once. Message bytes dominate only from about 1 MB on; for 1 KB messages
the ratio mostly shows the per-session cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.core_bench import Sink  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.procs import ProxyProcess  # noqa: E402

UNITS = {"K": 1024, "M": 1024 * 1024}


def parse_size(text: str) -> int:
    """``1K``, ``24M`` or a plain number of bytes."""
    unit = UNITS.get(text[-1:].upper())
    return int(text[:-1]) * unit if unit else int(text)


def message(size: int) -> bytes:
    """A plain message of about ``size`` bytes: 76-character lines, CRLF."""
    head = b"From: a@sender.example\r\nTo: user@example.org\r\nSubject: memory bench\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    return head + line * max(1, (size - len(head)) // len(line))


def rss_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def reset_peak(pid: int) -> None:
    """VmHWM := VmRSS (a /proc write, instant)."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


async def send(port: int, body: bytes) -> bytes:
    """One session: EHLO, MAIL, RCPT, DATA (pipelined envelope), the message; the final reply line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await reader.readline()
        writer.write(b"EHLO bench.example\r\n")
        while (await reader.readline())[3:4] == b"-":
            pass
        writer.write(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n")
        for _ in range(3):
            await reader.readline()
        writer.write(body)
        writer.write(b".\r\n")
        await writer.drain()
        reply = await reader.readline()
        writer.write(b"QUIT\r\n")
        return reply
    finally:
        writer.close()


async def round_ratio(proxy: ProxyProcess, body: bytes, parallel: int) -> tuple[float, list[bytes]]:
    assert proxy.proc is not None
    pid = proxy.proc.pid
    reset_peak(pid)
    before = rss_kb(pid, "VmRSS")
    replies = await asyncio.gather(*(send(proxy.port, body) for _ in range(parallel)))
    grown = (rss_kb(pid, "VmHWM") - before) * 1024
    return grown / (parallel * len(body)), replies


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1K,1M,24M")
    ap.add_argument("--parallel", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--config-extra", default="{}", help="JSON merged into the proxy config")
    args = ap.parse_args()
    dns = DnsServer({})
    dns.start()
    sink = await Sink().start()
    config = {
        "backend": f"smtp://127.0.0.1:{sink.port}",
        "relay_domains": ["example.org"],
        "dns": {"reverse_lookup": False, "nameservers": [dns.address]},
        "rules": str(ROOT / "rules"),
        "log": {"level": "warning"},
        "limits": {"max_message_size": 64 * 1024 * 1024},
        **json.loads(args.config_extra),
    }
    results = {}
    try:
        for text in args.sizes.split(","):
            body = message(parse_size(text))
            ratios = []
            for _ in range(args.rounds):
                # A fresh process each round: memory freed by one round stays in
                # the allocator's heap and would hide the next round's growth.
                proxy = ProxyProcess(Path(tempfile.mkdtemp(prefix="smtpproxy-memory-")), config).start()
                try:
                    await send(proxy.port, message(1024))  # warm up: imports, pools, caches
                    ratio, replies = await round_ratio(proxy, body, args.parallel)
                finally:
                    proxy.stop()
                assert all(r.startswith(b"250") for r in replies), replies[:3]
                ratios.append(ratio)
            results[text] = min(ratios)
            inflight = args.parallel * len(body) / 1e6
            print(
                f"{args.parallel} x {text:>4} in flight ({inflight:8.2f} MB): "
                f"peak RSS growth / bytes in flight = {min(ratios):6.2f} (rounds: "
                + ", ".join(f"{r:.2f}" for r in ratios)
                + ")"
            )
    finally:
        sink.stop()
        dns.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
