#!/usr/bin/env python3
"""Throughput and added latency of the proxy versus direct-to-sink, in one run.

    .venv/bin/python bench/core_bench.py [--messages 2000] [--sessions 1,20,100] [--rounds 3]
        [--postfix-backend] [--config-extra '{"backend_options": {"forward_client": "xclient"}}']

The sink is Postfix's ``smtp-sink`` when installed (else a built-in asyncio
sink); the load is Postfix's ``smtp-source`` (one new connection per message,
2 KB messages) when installed, else a built-in async generator. Latency
percentiles always come from the built-in generator (smtp-source reports
none). ``--postfix-backend`` puts a private real Postfix (``tests/postfix.py``,
mail discarded after the queue) in the sink's place, for what smtp-sink cannot
do (XCLIENT, XFORWARD). Prints medians over rounds and the proxy/direct ratios, plus the
proxy's peak RSS with 100 sessions sending 1 MB messages.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.dnsserver import DnsServer  # noqa: E402
from tests.postfix import PostfixInstance  # noqa: E402
from tests.procs import ProxyProcess, free_port, tool, wait_port  # noqa: E402

# The checks of the proxy core (relay domains, limits) only; "all" adds SPF, DKIM,
# ARC, DMARC (against a loopback DNS server answering NXDOMAIN) and the shipped rules.
CORE_ONLY = {
    "spf": {"enabled": False},
    "dkim": {"enabled": False},
    "arc": {"enabled": False},
    "dmarc": {"enabled": False},
}

BODY_2K = (
    b"From: a@sender.example\r\nTo: user@example.org\r\nSubject: bench\r\n\r\n" + (b"x" * 76 + b"\r\n") * 25
)


async def _builtin_sink(port: int) -> asyncio.base_events.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 sink ESMTP\r\n")
        in_data = False
        try:
            while line := await reader.readline():
                if in_data:
                    if line == b".\r\n":
                        in_data = False
                        writer.write(b"250 2.0.0 Ok\r\n")
                    continue
                cmd = line[:4].upper()
                if cmd == b"EHLO":
                    writer.write(
                        b"250-sink\r\n250-PIPELINING\r\n250-8BITMIME\r\n250-SMTPUTF8\r\n250 SIZE 100000000\r\n"
                    )
                elif cmd == b"DATA":
                    in_data = True
                    writer.write(b"354 go\r\n")
                elif cmd == b"QUIT":
                    writer.write(b"221 bye\r\n")
                    await writer.drain()
                    break
                else:
                    writer.write(b"250 2.0.0 Ok\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass  # the bench is over or the client went away
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port, backlog=1024)


class Sink:
    """The fast sink both sides of a comparison deliver to: Postfix smtp-sink, else a built-in one.

    ``postfix`` also says whether smtp-source is there to generate the load.
    """

    def __init__(self) -> None:
        self.port = free_port()
        self.postfix = (
            shutil.which(tool("smtp-sink")) is not None and shutil.which(tool("smtp-source")) is not None
        )
        self._proc: subprocess.Popen[bytes] | None = None
        self.pid: int | None = None  # smtp-sink's, for CPU accounting
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> Sink:
        if self.postfix:
            self._proc = subprocess.Popen(  # noqa: ASYNC220 - started once, before any load
                [tool("smtp-sink"), "-u", "root", "-c", f"127.0.0.1:{self.port}", "1024"],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            wait_port(self.port)
            self.pid = self._proc.pid
        else:
            self._server = await _builtin_sink(self.port)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            self._proc.terminate()
        if self._server is not None:
            self._server.close()


async def _one_message(port: int, body: bytes) -> float:
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def expect(prefix: bytes) -> None:
        while True:
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
            if line[3:4] != b"-":
                if not line.startswith(prefix):
                    raise RuntimeError(line)
                return

    await expect(b"220")
    writer.write(b"EHLO bench.test\r\n")
    await expect(b"250")
    writer.write(b"MAIL FROM:<a@sender.example>\r\nRCPT TO:<user@example.org>\r\nDATA\r\n")
    await expect(b"250")
    await expect(b"250")
    await expect(b"354")
    writer.write(body + b".\r\n")
    await expect(b"250")
    writer.write(b"QUIT\r\n")
    await expect(b"221")
    writer.close()
    return time.perf_counter() - started


async def builtin_load(port: int, messages: int, sessions: int, body: bytes) -> tuple[float, list[float]]:
    """(messages/s, per-message latencies) with ``sessions`` concurrent clients."""
    latencies: list[float] = []
    remaining = messages

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            latencies.append(await _one_message(port, body))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    return messages / (time.perf_counter() - started), latencies


def smtp_source_load(port: int, messages: int, sessions: int) -> float:
    started = time.perf_counter()
    subprocess.run(
        [
            tool("smtp-source"),
            "-l",
            "2048",
            "-m",
            str(messages),
            "-s",
            str(sessions),
            "-f",
            "a@sender.example",
            "-t",
            "user@example.org",
            f"127.0.0.1:{port}",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=600,
    )
    return messages / (time.perf_counter() - started)


async def throughput(port: int, messages: int, sessions: int, use_postfix: bool) -> float:
    """Messages/s of one load run: smtp-source when Postfix is there, else the built-in load."""
    if use_postfix:
        return await asyncio.to_thread(smtp_source_load, port, messages, sessions)
    return (await builtin_load(port, messages, sessions, BODY_2K))[0]


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else 0.0


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", default="1,20,100")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--config-extra", default="{}", help="JSON merged into the proxy config")
    ap.add_argument("--checks", choices=("core", "all"), default="core", help="which checks run in the proxy")
    ap.add_argument(
        "--compare-workers",
        action="store_true",
        help="instead: throughput of workers: 2 / workers: 1 (20 and 50 sessions)",
    )
    ap.add_argument(
        "--postfix-backend",
        action="store_true",
        help="a private real Postfix as the backend (XCLIENT, XFORWARD)",
    )
    args = ap.parse_args()
    dns = DnsServer({})
    dns.start()
    sink = await Sink().start()
    use_postfix, sink_port = sink.postfix, sink.port
    postfix: PostfixInstance | None = None
    if args.postfix_backend:
        postfix = PostfixInstance()
        postfix.configure(virtual_transport="discard:bench")
        await asyncio.to_thread(postfix.start)
        sink_port = postfix.port
    tmp = Path(tempfile.mkdtemp(prefix="smtpproxy-bench-"))
    config = {
        "backend": f"smtp://127.0.0.1:{sink_port}",
        "relay_domains": ["example.org"],
        "dns": {"reverse_lookup": False, "nameservers": [dns.address]},
        "rules": str(ROOT / "smtpproxy" / "data" / "rules") if args.checks == "all" else None,
        "log": {"level": "info"},
        "limits": {"max_connections": 5000, "max_connections_per_ip": None},  # all load is from 127.0.0.1
        **(CORE_ONLY if args.checks == "core" else {}),
        **json.loads(args.config_extra),
    }
    if args.compare_workers:
        try:
            await compare_workers(config, args, sink)
        finally:
            sink.stop()
            dns.stop()
            if postfix is not None:
                postfix.cleanup()
        return
    proxy = ProxyProcess(tmp, config).start()
    assert proxy.proc is not None
    results: dict[str, object] = {"load": "smtp-source" if use_postfix else "builtin", "sessions": {}}
    try:
        for sessions in [int(s) for s in args.sessions.split(",")]:
            direct, via, p50d, p99d, p50p, p99p = [], [], [], [], [], []
            for _ in range(args.rounds):
                direct.append(await throughput(sink_port, args.messages, sessions, use_postfix))
                via.append(await throughput(proxy.port, args.messages, sessions, use_postfix))
                n = min(args.messages, 400)
                _, lat_d = await builtin_load(sink_port, n, sessions, BODY_2K)
                _, lat_p = await builtin_load(proxy.port, n, sessions, BODY_2K)
                p50d.append(pct(lat_d, 0.5))
                p99d.append(pct(lat_d, 0.99))
                p50p.append(pct(lat_p, 0.5))
                p99p.append(pct(lat_p, 0.99))
            d, p = statistics.median(direct), statistics.median(via)
            results["sessions"][sessions] = {  # type: ignore[index]
                "direct_msgs_per_s": round(d, 1),
                "proxy_msgs_per_s": round(p, 1),
                "ratio": round(p / d, 3),
                "added_latency_p50_ms": round((statistics.median(p50p) - statistics.median(p50d)) * 1000, 2),
                "added_latency_p99_ms": round((statistics.median(p99p) - statistics.median(p99d)) * 1000, 2),
            }
            print(json.dumps({sessions: results["sessions"][sessions]}), flush=True)  # type: ignore[index]
        big = b"From: a@sender.example\r\nSubject: big\r\n\r\n" + (b"y" * 998 + b"\r\n") * 1048
        base_rss = peak_rss_kb(proxy.proc.pid)
        await builtin_load(proxy.port, 200, 100, big)
        results["peak_rss_mb_100x1MB"] = round(peak_rss_kb(proxy.proc.pid) / 1024, 1)
        results["rss_before_mb"] = round(base_rss / 1024, 1)
    finally:
        proxy.stop()
        sink.stop()
        dns.stop()
        if postfix is not None:
            postfix.cleanup()
    print(json.dumps(results, indent=2))


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) of a process and all its descendants, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    pending = [pid]
    while pending:
        p = pending.pop()
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
            total += (int(fields[11]) + int(fields[12])) / tick
            for task in Path(f"/proc/{p}/task").iterdir():
                pending += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return total


def measured_load(
    port: int, messages: int, sessions: int, sink: Sink, proxy_pid: int
) -> tuple[float, float, float]:
    """(msgs/s, proxy CPU ms per message, load generator + sink CPU ms per message)."""
    sink_before = tree_cpu_seconds(sink.pid) if sink.pid else 0.0
    proxy_before = tree_cpu_seconds(proxy_pid)
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rate = smtp_source_load(port, messages, sessions)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    source = (children.ru_utime + children.ru_stime) - (children_before.ru_utime + children_before.ru_stime)
    sink_cpu = (tree_cpu_seconds(sink.pid) if sink.pid else 0.0) - sink_before
    proxy_cpu = tree_cpu_seconds(proxy_pid) - proxy_before
    return rate, proxy_cpu / messages * 1000, (source + sink_cpu) / messages * 1000


async def compare_workers(config: dict[str, object], args: argparse.Namespace, sink: Sink) -> None:
    """workers: 2 versus workers: 1, interleaved rounds, at 20 and 50 sessions.

    With smtp-source, also the CPU each side used per message, and from it the
    best ratio this machine allows: two cores shared by two workers and the
    load generator and sink give at most 2 / (proxy + load CPU per message).
    At 20 sessions the two workers are not kept busy all the time (the kernel
    spreads connections unevenly over them); 50 sessions keep them saturated.
    """
    procs = {
        n: ProxyProcess(Path(tempfile.mkdtemp(prefix=f"smtpproxy-w{n}-")), {**config, "workers": n}).start()
        for n in (1, 2)
    }
    await asyncio.sleep(2)  # let every worker bind
    results: dict[int, dict[str, object]] = {}
    try:
        for sessions in (20, 50):
            results[sessions] = await _compare_at(procs, sessions, args, sink)
            print(json.dumps({sessions: results[sessions]}), flush=True)
    finally:
        for proc in procs.values():
            proc.stop()
    print(json.dumps({"sessions": results}, indent=2))


async def _compare_at(
    procs: dict[int, ProxyProcess], sessions: int, args: argparse.Namespace, sink: Sink
) -> dict[str, object]:
    rates: dict[int, list[float]] = {1: [], 2: []}
    proxy_cpu: dict[int, list[float]] = {1: [], 2: []}
    load_cpu: list[float] = []
    for _ in range(args.rounds):
        for n, proc in procs.items():
            if sink.postfix:
                assert proc.proc is not None
                rate, pcpu, lcpu = await asyncio.to_thread(
                    measured_load, proc.port, args.messages, sessions, sink, proc.proc.pid
                )
                rates[n].append(rate)
                proxy_cpu[n].append(pcpu)
                load_cpu.append(lcpu)
            else:
                rates[n].append(await throughput(proc.port, args.messages, sessions, False))
    one, two = statistics.median(rates[1]), statistics.median(rates[2])
    result: dict[str, object] = {
        "workers_1_msgs_per_s": round(one, 1),
        "workers_2_msgs_per_s": round(two, 1),
        "ratio": round(two / one, 3),
    }
    if load_cpu:
        p2, load = statistics.median(proxy_cpu[2]), statistics.median(load_cpu)
        bound = 2 / ((p2 + load) / 1000) / one
        result |= {
            "proxy_cpu_ms_per_msg": {n: round(statistics.median(v), 3) for n, v in proxy_cpu.items()},
            "load_and_sink_cpu_ms_per_msg": round(load, 3),
            "cpu_bound_ratio": round(bound, 3),
            "share_of_bound": round(two / one / bound, 3),
        }
    return result


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(ROOT))
    asyncio.run(main())
