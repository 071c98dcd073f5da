#!/usr/bin/env python3
"""Soak: mixed traffic at a steady rate for a long time; resources must stay flat, nothing lost.

    .venv/bin/python bench/soak.py [--minutes 30] [--rate 40]

Traffic (round robin): clean mail, DKIM-signed mail, mail to a recipient the
backend refuses (5xx), mail the backend tempfails (4xx), DMARC p=reject spoofs
(refused by us), sessions that vanish mid-DATA, and mail over STARTTLS. Every
message carries a unique id; at the end, every message whose client got 250 must
be in the sink exactly once, and no other. Prints RSS, open file descriptors and
asyncio task count of the proxy at the start and at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import re
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from tests.backends import RecordingBackend  # noqa: E402
from tests.dkimkeys import rsa_key, sign  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.procs import ProxyProcess  # noqa: E402
from tests.smtpclient import RawClient, dot_stuff  # noqa: E402

KINDS = ("clean", "signed", "rcpt_refused", "tempfailed", "spoof", "vanish", "tls")
ID = re.compile(rb"Message-ID: <(soak-\d+)@")


def message(n: int, sender_domain: str) -> bytes:
    return (
        f"From: Soak <soak@{sender_domain}>\r\nTo: user@example.org\r\nSubject: soak {n}\r\n"
        f"Message-ID: <soak-{n}@{sender_domain}>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\n"
        + "body line\r\n"
        * 20
    ).encode()


def proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1))  # type: ignore[union-attr]
    return {"rss_kb": rss, "fds": len(list(Path(f"/proc/{pid}/fd").iterdir()))}


def metric(url: str, name: str) -> float:
    with urllib.request.urlopen(url, timeout=5) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return -1.0


async def one(kind: str, n: int, port: int, key: object, ca: trustme.CA) -> tuple[str, int | None]:
    """Run one session of ``kind``; (message id, final reply code or None)."""
    domain = "signed.example" if kind in ("signed", "spoof") else "sender.example"
    body = message(n, domain)
    if kind == "signed":
        body = sign(body, key, domain="signed.example", selector="sel")  # type: ignore[arg-type]
    rcpt = {"rcpt_refused": "gone@example.org", "tempfailed": "later@example.org"}.get(
        kind, "user@example.org"
    )
    async with RawClient("127.0.0.1", port, timeout=30) as c:
        await c.connect()
        await c.cmd("EHLO soak.test")
        if kind == "tls":
            assert (await c.cmd("STARTTLS")).code == 220
            ctx = ssl.create_default_context()
            ca.configure_trust(ctx)
            assert c.writer is not None
            await c.writer.start_tls(ctx, server_hostname="mx.soak.example")
            await c.cmd("EHLO soak.test")
        if (await c.cmd(f"MAIL FROM:<soak@{domain}>")).code != 250:
            return f"soak-{n}", None
        if (await c.cmd(f"RCPT TO:<{rcpt}>")).code != 250:
            return f"soak-{n}", None
        if (await c.cmd("DATA")).code != 354:
            return f"soak-{n}", None
        if kind == "vanish":
            await c.send(dot_stuff(body)[: len(body) // 2])
            return f"soak-{n}", None
        r = await c.cmd(dot_stuff(body) + b".")
        await c.cmd("QUIT")
        return f"soak-{n}", r.code


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--rate", type=float, default=40.0, help="sessions per second")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="smtpproxy-soak-"))
    key = rsa_key(2048)
    ca = trustme.CA()
    cert = ca.issue_cert("mx.soak.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp / "key.pem"))
    dns = DnsServer(
        {
            "signed.example": [("TXT", "v=spf1 -all")],
            "sel._domainkey.signed.example": [("TXT", key.txt)],
            "_dmarc.signed.example": [("TXT", "v=DMARC1; p=reject")],
        }
    )
    dns.start()
    sink = RecordingBackend()
    sink.rcpt_replies["gone@example.org"] = "550 5.1.1 No such user"
    sink.rcpt_replies["later@example.org"] = "450 4.2.1 Mailbox busy"
    await sink.start()
    proxy = ProxyProcess(
        tmp,
        {
            "backend": f"smtp://127.0.0.1:{sink.port}",
            "hostname": "mx.soak.example",
            "relay_domains": ["example.org"],
            "dns": {"nameservers": [dns.address], "reverse_lookup": False},
            "backend_options": {"tls_verify": False},
            "tls": {"cert": str(tmp / "cert.pem"), "key": str(tmp / "key.pem")},
            "log": {"level": "warning"},
        },
    ).start()
    assert proxy.proc is not None
    murl = f"http://127.0.0.1:{proxy.metrics_port}/metrics"
    await asyncio.sleep(6)  # the task gauge is sampled every 5 s
    start = {**proc_stats(proxy.proc.pid), "tasks": metric(murl, "smtpproxy_event_loop_tasks")}
    accepted: set[str] = set()
    outcomes: dict[str, int] = {}
    latencies: list[float] = []
    deadline = time.monotonic() + args.minutes * 60
    pending: set[asyncio.Task[tuple[str, int | None]]] = set()
    counter = itertools.count()
    interval = 1.0 / args.rate
    timeline: list[float] = []
    next_sample = time.monotonic()
    try:
        while time.monotonic() < deadline:
            if time.monotonic() >= next_sample:
                timeline.append(round(proc_stats(proxy.proc.pid)["rss_kb"] / 1024, 1))
                next_sample += 60
            n = next(counter)
            kind = KINDS[n % len(KINDS)]
            started = time.perf_counter()

            async def run(kind: str = kind, n: int = n, started: float = started) -> tuple[str, int | None]:
                mid, code = await one(kind, n, proxy.port, key, ca)
                latencies.append(time.perf_counter() - started)
                label = f"{kind}:{code}"
                outcomes[label] = outcomes.get(label, 0) + 1
                if code == 250:
                    accepted.add(mid)
                return mid, code

            task = asyncio.ensure_future(run())
            pending.add(task)
            task.add_done_callback(pending.discard)
            await asyncio.sleep(interval)
        await asyncio.gather(*pending)
        await asyncio.sleep(6)
        end = {**proc_stats(proxy.proc.pid), "tasks": metric(murl, "smtpproxy_event_loop_tasks")}
    finally:
        proxy.stop()
        await sink.stop()
        dns.stop()
    delivered = [m.group(1).decode() for msg in sink.messages if (m := ID.search(msg.content))]
    violations = len(set(delivered) ^ accepted) + (len(delivered) - len(set(delivered)))
    print(
        json.dumps(
            {
                "minutes": args.minutes,
                "sessions": sum(outcomes.values()),
                "outcomes": outcomes,
                "start": start,
                "end": end,
                "rss_mb_each_minute": timeline,
                "p50_ms": round(statistics.median(latencies) * 1000, 1) if latencies else None,
                "invariant_violations": violations,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    asyncio.run(main())
