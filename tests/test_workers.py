"""``workers: 2``: two processes on one port, metrics aggregated, SIGTERM drains both."""

from __future__ import annotations

import json
import smtplib
import time
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.dnsserver import DnsServer
from tests.procs import ProxyProcess
from tests.smtpclient import make_message


def _messages_total(url: str) -> float:
    with urllib.request.urlopen(url, timeout=10) as resp:
        text = resp.read().decode()
    return sum(
        s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.name == "smtpproxy_messages_total" and s.labels.get("action") == "delivered"
    )


def test_two_workers_share_the_port_and_metrics_are_aggregated(tmp_path: Path, dns_server: DnsServer) -> None:
    proxy = ProxyProcess(
        tmp_path,
        {
            "workers": 2,
            "backend": "maildir:mail",
            "relay_domains": ["example.org"],
            # The test DNS server, never the machine's resolver (/readyz asks it).
            "dns": {"reverse_lookup": False, "nameservers": [dns_server.address], "timeout": 3.0},
            "spf": {"enabled": False},
            "dmarc": {"enabled": False},
        },
    ).start()
    try:
        deadline = time.monotonic() + 30
        while proxy.log().count('"msg": "listening"') < 2:
            assert time.monotonic() < deadline, proxy.log()
            time.sleep(0.1)
        sent = 40
        for i in range(sent):
            with smtplib.SMTP("127.0.0.1", proxy.port, timeout=10) as s:
                s.sendmail("a@sender.example", ["user@example.org"], make_message(subject=f"m{i}"))
        assert len(list((tmp_path / "mail" / "new").iterdir())) == sent
        assert _messages_total(f"http://127.0.0.1:{proxy.metrics_port}/metrics") == sent
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/readyz", timeout=10) as resp:
            assert resp.status == 200
    finally:
        assert proxy.stop() == 0
    pids = set()
    for line in proxy.log().splitlines():
        if line.startswith("{") and '"transaction"' in line:
            pids.add(json.loads(line)["pid"])
    assert len(pids) == 2, "both workers served connections"
