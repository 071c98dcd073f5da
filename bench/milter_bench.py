#!/usr/bin/env python3
"""Postfix with our milter versus Postfix alone, in one run: the cost of milter mode.

    .venv/bin/python bench/milter_bench.py [--messages 1000] [--sessions 1,20] [--rounds 3]

Two private Postfix instances (``tests/postfix.py``, mail discarded after the
queue: ``virtual_transport = discard``), one with ``smtpd_milters`` pointing at
a ``smtpproxy serve`` process in milter-only mode (SPF, DKIM, ARC, DMARC against
a loopback DNS server, and the shipped rules), one without. The load is
Postfix's ``smtp-source`` (2 KB messages, one connection per message, as in
``core_bench.py``), alternating between the two each round. Prints medians over
rounds, the ratio milter/alone, and the milter process's CPU per message.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402

from bench.core_bench import CORE_ONLY, smtp_source_load, tree_cpu_seconds  # noqa: E402
from tests.dnsserver import DnsServer  # noqa: E402
from tests.postfix import PostfixInstance  # noqa: E402
from tests.procs import free_port, wait_port  # noqa: E402

ZONE = {
    "sender.example": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "_dmarc.sender.example": [("TXT", "v=DMARC1; p=none")],
}


def start_milter(folder: Path, port: int, dns: DnsServer, checks: str) -> subprocess.Popen[bytes]:
    config: dict[str, object] = {
        "listen": None,
        "metrics": None,
        "hostname": "mx.bench.example",
        "milter": {"listen": f"127.0.0.1:{port}"},
        "relay_domains": ["example.org"],
        "rules": str(ROOT / "smtpproxy" / "data" / "rules"),
        "rules_options": {"reload_interval": 0},
        "dns": {"nameservers": [dns.address], "reverse_lookup": False},
        "log": {"level": "warning"},
        # Every bench client is 127.0.0.1: the per-IP concurrency limit would refuse them.
        "limits": {"max_connections_per_ip": 10_000},
    }
    if checks == "core":
        config.update(CORE_ONLY, rules=None)
    path = folder / "milter.yaml"
    path.write_text(yaml.safe_dump(config))
    proc = subprocess.Popen(
        [sys.executable, "-m", "smtpproxy", "serve", "--config", str(path)],
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=(folder / "milter.log").open("wb"),
    )
    wait_port(port)
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--messages", type=int, default=1000)
    ap.add_argument("--sessions", default="1,20")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--checks", choices=("core", "all"), default="all", help="core: the protocol cost alone")
    args = ap.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="milter-bench-"))
    milter_port = free_port()
    dns = DnsServer(dict(ZONE))
    dns.start()
    alone, filtered = PostfixInstance(), PostfixInstance()
    for pf in (alone, filtered):
        pf.configure(virtual_transport="discard:bench")
    filtered.configure(
        smtpd_milters=f"inet:127.0.0.1:{milter_port}", milter_protocol="6", milter_default_action="tempfail"
    )
    milter = start_milter(folder, milter_port, dns, args.checks)
    results: dict[str, object] = {
        "messages": args.messages,
        "rounds": args.rounds,
        "checks": args.checks,
        "sessions": {},
    }
    try:
        alone.start()
        filtered.start()
        for sessions in (int(s) for s in args.sessions.split(",")):
            rates: dict[str, list[float]] = {"alone": [], "milter": []}
            cpu: list[float] = []
            for _ in range(args.rounds):
                rates["alone"].append(smtp_source_load(alone.port, args.messages, sessions))
                before = tree_cpu_seconds(milter.pid)
                rates["milter"].append(smtp_source_load(filtered.port, args.messages, sessions))
                cpu.append((tree_cpu_seconds(milter.pid) - before) / args.messages * 1000)
            medians = {k: statistics.median(v) for k, v in rates.items()}
            results["sessions"][str(sessions)] = {  # type: ignore[index]
                "alone_msgs_per_s": round(medians["alone"], 1),
                "milter_msgs_per_s": round(medians["milter"], 1),
                "ratio": round(medians["milter"] / medians["alone"], 3),
                "milter_cpu_ms_per_msg": round(statistics.median(cpu), 2),
            }
        rejected = filtered.maillog().count("milter-reject")
        results["milter_rejects"] = rejected  # anything but 0: the milter refused bench mail
    except subprocess.CalledProcessError:
        # What Postfix said about it (milter trouble shows here), then the milter's own log.
        lines = [x for x in filtered.maillog().splitlines() if "milter" in x or "warning" in x]
        print("\n".join(lines[-20:]), (folder / "milter.log").read_text()[-3000:], sep="\n", file=sys.stderr)
        raise
    finally:
        milter.terminate()
        milter.wait(30)
        alone.cleanup()
        filtered.cleanup()
        dns.stop()
        time.sleep(0)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
