#!/usr/bin/env python3
"""Rate-limit overhead and memory, for the report and the README.

    .venv/bin/python bench/ratelimit_bench.py [--memory] [--micro] [--proxy]
        [--messages 2000] [--sessions 20] [--rounds 3]

--memory  1,000,000 distinct keys through the memory store: bytes (tracemalloc).
--micro   the ``ratelimit`` check alone: messages/s through five limits per message
          (connect rate, concurrency, mail rate, two rcpt rates) on the memory
          store and on Redis (loopback), sequential and 50 concurrent sessions.
--proxy   the running proxy (one process) behind smtp-source -> proxy -> smtp-sink
          (built-in load/sink when Postfix tools are missing): messages/s with
          no limits, five limits on memory, five limits on Redis; ratios to no limits,
          of throughput and of the proxy's CPU per message, medians over rounds that
          each start fresh proxy processes.
With no option, all three run. Rates are set high so nothing is refused: this
measures the cost of checking, not of refusing. Redis is a real redis-server
started here on a free loopback port.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import statistics
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from core_bench import Sink, throughput, tree_cpu_seconds  # noqa: E402

from smtpproxy.config import build_config  # noqa: E402
from smtpproxy.metrics import Metrics  # noqa: E402
from smtpproxy.ratelimit.check import RateLimitCheck, build_ratelimit_checks  # noqa: E402
from smtpproxy.ratelimit.memory import MemoryStore  # noqa: E402
from smtpproxy.ratelimit.store import RateEntry  # noqa: E402
from smtpproxy.session import Recipient, Session, Transaction  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.procs import ProxyProcess  # noqa: E402
from tests.redisserver import RedisServer  # noqa: E402

HIGH = "100000000/hour"
FIVE_LIMITS: list[dict[str, Any]] = [
    {"name": "conn_per_ip", "key": "client_ip", "rate": HIGH, "on": "connect"},
    {"name": "concurrent", "key": "client_ip", "concurrency": 100000},
    {"name": "msgs_per_ip", "key": "client_net", "rate": HIGH, "on": "mail"},
    {"name": "rcpts_per_from", "key": "sender_domain", "rate": HIGH, "on": "rcpt"},
    {"name": "per_rcpt", "key": "recipient", "rate": HIGH, "on": "rcpt"},
]


def memory_measurement(keys: int = 1_000_000) -> dict[str, Any]:
    """Bytes held by the memory store before and after ``keys`` distinct keys."""
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    store = MemoryStore(max_keys=1_000_000)
    empty = tracemalloc.get_traced_memory()[0] - base
    started = time.perf_counter()
    now = time.monotonic()
    for i in range(keys):
        store.apply_at([RateEntry(f"msgs_per_ip:{ipaddress.IPv4Address(i + 16777216)}", 7.2, 50)], now)
    elapsed = time.perf_counter() - started
    full = tracemalloc.get_traced_memory()[0] - base
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    return {
        "keys": keys,
        "capacity": store.capacity,
        "bytes_empty": empty,
        "bytes_after": full,
        "bytes_peak": peak,
        "keys_held": store.used(now),
        "us_per_key_traced": round(elapsed / keys * 1e6, 2),
    }


async def _sessions(check: RateLimitCheck | None, messages: int, concurrency: int) -> float:
    """messages/s through the check's stages (connect, mail, 2 rcpt, disconnect)."""
    remaining = messages

    async def worker(w: int) -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            s = Session(f"S{w}.{remaining}", ipaddress.ip_address("192.0.2.1"), 1, "127.0.0.1", 25)
            if check is None:
                continue
            txn = Transaction("T", "a@sender.example")
            assert await check.connect(s) is None
            assert await check.mail(s, txn) is None
            for rcpt in ("u1@example.org", "u2@example.org"):
                assert await check.rcpt(s, txn, Recipient(rcpt)) is None
            await check.disconnect(s)

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    return messages / (time.perf_counter() - started)


async def micro(redis_url: str, messages: int) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for store in ("memory", redis_url):
        config = build_config({"ratelimits": FIVE_LIMITS, "ratelimit_store": store})
        check = build_ratelimit_checks(config, Metrics(process=False))[0]
        assert isinstance(check, RateLimitCheck)
        name = "memory" if store == "memory" else "redis"
        for conc in (1, 50):
            out[f"{name}_c{conc}_msgs_per_s"] = round(await _sessions(check, messages, conc), 1)
        await check.close()
    return out


async def proxy(redis_url: str, messages: int, sessions: int, rounds: int) -> dict[str, Any]:
    sink = await Sink().start()
    use_postfix, sink_port = sink.postfix, sink.port
    dns = DnsServer({})  # loopback only: SPF and DMARC get quick NXDOMAIN answers
    dns.start()
    base: dict[str, Any] = {
        "backend": f"smtp://127.0.0.1:{sink_port}",
        "relay_domains": ["example.org"],
        "dns": {"reverse_lookup": False, "nameservers": [dns.address]},
        "log": {"level": "warning"},
        "limits": {"max_connections": 5000, "max_connections_per_ip": None},  # all load is from 127.0.0.1
    }
    variants: dict[str, dict[str, Any]] = {
        "none": base,
        "memory": {**base, "ratelimits": FIVE_LIMITS},
        "redis": {**base, "ratelimits": FIVE_LIMITS, "ratelimit_store": redis_url},
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    try:
        for _ in range(rounds):
            # Fresh processes every round: one process's luck (hash seed, memory
            # layout) moves its CPU per message by several percent, so each
            # round is an independent sample; variants interleave, so drift on
            # the machine hits them alike.
            for name, cfg in variants.items():
                folder = Path(tempfile.mkdtemp(prefix=f"rl-bench-{name}-"))
                p = ProxyProcess(folder, cfg).start()
                try:
                    assert p.proc is not None
                    await throughput(p.port, min(messages // 10, 200), sessions, use_postfix)  # warm
                    before = tree_cpu_seconds(p.proc.pid)
                    rates[name].append(await throughput(p.port, messages, sessions, use_postfix))
                    cpu[name].append((tree_cpu_seconds(p.proc.pid) - before) / messages * 1e6)
                finally:
                    p.stop()
    finally:
        sink.stop()
        dns.stop()
    med = {name: statistics.median(r) for name, r in rates.items()}
    us = {name: statistics.median(c) for name, c in cpu.items()}
    # Throughput moves with whatever else the two cores run; the proxy's own CPU
    # per message much less: both ratios are reported.
    return {
        "load": "smtp-source" if use_postfix else "builtin",
        "sessions": sessions,
        "msgs_per_s": {k: round(v, 1) for k, v in med.items()},
        "ratio_memory": round(med["memory"] / med["none"], 3),
        "ratio_redis": round(med["redis"] / med["none"], 3),
        "proxy_cpu_us_per_msg": {k: round(v) for k, v in us.items()},
        "cpu_ratio_memory": round(us["none"] / us["memory"], 3),
        "cpu_ratio_redis": round(us["none"] / us["redis"], 3),
        "rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--micro", action="store_true")
    ap.add_argument("--proxy", action="store_true")
    ap.add_argument("--messages", type=int, default=2000)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    everything = not (args.memory or args.micro or args.proxy)
    results: dict[str, Any] = {}
    if args.memory or everything:
        results["memory_store_1M_keys"] = memory_measurement()
        print(json.dumps(results["memory_store_1M_keys"]), flush=True)
    if not (args.micro or args.proxy or everything):
        print(json.dumps(results, indent=2))
        return
    redis = RedisServer(Path(tempfile.mkdtemp(prefix="rl-bench-redis-")))
    redis.start()
    try:
        if args.micro or everything:
            results["check_only"] = await micro(redis.url, args.messages)
            print(json.dumps(results["check_only"]), flush=True)
        if args.proxy or everything:
            results["proxy"] = await proxy(redis.url, args.messages, args.sessions, args.rounds)
    finally:
        redis.stop()
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
