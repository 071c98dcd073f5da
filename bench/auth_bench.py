#!/usr/bin/env python3
"""Throughput with SPF+DKIM+ARC+DMARC on, as a ratio to the proxy with those checks off.

    .venv/bin/python bench/auth_bench.py [--messages 1500] [--sessions 20] [--rounds 3]

A mix of DKIM-signed (RSA-2048) and unsigned 2 KB messages from a domain with SPF,
DKIM and DMARC records, served by the test DNS server on loopback; the DNS cache
is warm after the first messages. Also prints the median time of one DKIM
verification and one SPF evaluation with a warm cache, measured in-process, and
the proxies' CPU time per message (from /proc; load from other processes on the
machine moves it far less than it moves throughput).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.core_bench import _builtin_sink, _one_message  # noqa: E402
from smtpproxy.auth.dkim import DkimVerifier  # noqa: E402
from smtpproxy.auth.spf import SpfChecker  # noqa: E402
from smtpproxy.dns import Resolver  # noqa: E402
from tests.dkimkeys import rsa_key, sign  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.procs import ProxyProcess, free_port  # noqa: E402

DOMAIN = "sender.example"


def messages() -> list[bytes]:
    key = rsa_key(2048)
    body = b"".join(
        b"line %d of a two kilobyte message body, nothing to see here....\r\n" % i for i in range(28)
    )
    plain = (
        f"From: Alice <alice@{DOMAIN}>\r\nTo: user@example.org\r\nSubject: bench\r\n"
        f"Message-ID: <b1@{DOMAIN}>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
    ).encode() + body
    signed = sign(plain, key, domain=DOMAIN, selector="sel")
    return [signed, plain], key.txt  # type: ignore[return-value]


async def load(port: int, bodies: list[bytes], count: int, sessions: int) -> float:
    cycle = itertools.cycle(bodies)
    remaining = count

    async def worker() -> None:
        nonlocal remaining
        while remaining > 0:
            remaining -= 1
            await _one_message(port, next(cycle))

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    return count / (time.perf_counter() - started)


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (Linux /proc), 0.0 where unavailable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def micro(dns: DnsServer, signed: bytes) -> dict[str, float]:
    resolver = Resolver([dns.address], timeout=2.0)
    dkim_v = DkimVerifier(resolver)
    spf_c = SpfChecker(resolver)
    assert (await dkim_v.verify(signed))[0].result == "pass"
    assert (await spf_c.check("127.0.0.1", f"alice@{DOMAIN}", "client.test")).result == "pass"
    dk, sp = [], []
    for _ in range(200):
        t = time.perf_counter()
        await dkim_v.verify(signed)
        dk.append(time.perf_counter() - t)
        t = time.perf_counter()
        await spf_c.check("127.0.0.1", f"alice@{DOMAIN}", "client.test")
        sp.append(time.perf_counter() - t)
    await resolver.close()
    return {"dkim_verify_ms": statistics.median(dk) * 1000, "spf_eval_ms": statistics.median(sp) * 1000}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1500)
    ap.add_argument("--sessions", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    bodies, txt = messages()  # type: ignore[misc]
    dns = DnsServer(
        {
            DOMAIN: [("TXT", "v=spf1 include:_spf.sender.example -all")],
            f"_spf.{DOMAIN}": [("TXT", "v=spf1 ip4:127.0.0.0/8 ip4:192.0.2.0/24 ~all")],
            f"sel._domainkey.{DOMAIN}": [("TXT", txt)],
            f"_dmarc.{DOMAIN}": [("TXT", "v=DMARC1; p=reject; adkim=r; aspf=r")],
        }
    )
    dns.start()
    sink_port = free_port()
    sink = await _builtin_sink(sink_port)
    base = {
        "backend": f"smtp://127.0.0.1:{sink_port}",
        "relay_domains": ["example.org"],
        "dns": {"nameservers": [dns.address], "reverse_lookup": False},
        "rules": None,
        "log": {"level": "warning"},
    }
    off = {
        **base,
        "spf": {"enabled": False},
        "dkim": {"enabled": False},
        "arc": {"enabled": False},
        "dmarc": {"enabled": False},
    }
    proxies = {
        "on": ProxyProcess(Path(tempfile.mkdtemp()), base).start(),
        "off": ProxyProcess(Path(tempfile.mkdtemp()), off).start(),
    }
    try:
        await load(proxies["on"].port, bodies, 50, 5)  # warm the DNS cache
        rates: dict[str, list[float]] = {"on": [], "off": []}
        cpu: dict[str, list[float]] = {"on": [], "off": []}
        for _ in range(args.rounds):
            for name in ("off", "on"):
                pid = proxies[name].proc.pid  # type: ignore[union-attr]
                before = cpu_seconds(pid)
                rates[name].append(await load(proxies[name].port, bodies, args.messages, args.sessions))
                cpu[name].append((cpu_seconds(pid) - before) / args.messages)
        on, off_rate = statistics.median(rates["on"]), statistics.median(rates["off"])
        cpu_on, cpu_off = statistics.median(cpu["on"]), statistics.median(cpu["off"])
        result = {
            "sessions": args.sessions,
            "checks_off_msgs_per_s": round(off_rate, 1),
            "checks_on_msgs_per_s": round(on, 1),
            "ratio": round(on / off_rate, 3),
            "proxy_cpu_ms_per_msg_off": round(cpu_off * 1000, 3),
            "proxy_cpu_ms_per_msg_on": round(cpu_on * 1000, 3),
            "cpu_ratio": round(cpu_off / cpu_on, 3) if cpu_on else None,
            **{k: round(v, 3) for k, v in (await micro(dns, bodies[0])).items()},
        }
        print(json.dumps(result, indent=2))
    finally:
        for p in proxies.values():
            p.stop()
        sink.close()
        dns.stop()


if __name__ == "__main__":
    asyncio.run(main())
