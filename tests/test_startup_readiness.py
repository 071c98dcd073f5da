"""What the proxy says at start (one line of what is in force, a warning when nothing relays), and /readyz and DNS."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.backends import RecordingBackend
from tests.dnsserver import DnsServer
from tests.procs import ProxyProcess

RULE = "- name: no-spam-subject\n  stage: data\n  if: {subject: {contains: SPAM}}\n  then: reject\n"


def log_lines(proxy: ProxyProcess, msg: str, timeout: float = 10.0) -> list[dict[str, Any]]:
    """The JSON log lines of ``proxy`` whose msg starts with ``msg`` (waits for the first)."""
    deadline = time.monotonic() + timeout
    while True:
        lines = [json.loads(line) for line in proxy.log().splitlines() if line.startswith("{")]
        found = [line for line in lines if str(line.get("msg", "")).startswith(msg)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def test_start_logs_one_line_of_what_is_in_force(tmp_path: Path, dns_server: DnsServer) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "10-subject.yaml").write_text(RULE)
    proxy = ProxyProcess(
        tmp_path,
        {
            "backend": "maildir:mail",
            "relay_domains": ["example.org", "example.net"],
            "relay_networks": ["10.0.0.0/8", "2001:db8::/32", "192.0.2.0/24"],
            "rules": "rules",
            "log": {"format": "json", "level": "info"},
            "dns": {"reverse_lookup": False, "nameservers": [dns_server.address], "timeout": 3.0},
        },
    ).start()
    try:
        (line,) = log_lines(proxy, "listening")
    finally:
        assert proxy.stop() == 0
    assert line["level"] == "info"
    assert line["listen"] == f"127.0.0.1:{proxy.port}"
    assert line["metrics"] == f"127.0.0.1:{proxy.metrics_port}"
    assert line["backend"] == "maildir:mail"
    assert (line["relay_domains"], line["relay_networks"], line["rules"]) == (2, 3, 1)
    assert line["checks"] == ["ratelimit", "relay", "limits", "spf", "dkim", "arc", "dmarc", "rules"]
    assert not log_lines(proxy, "relay_domains is empty", timeout=0)


def test_start_warns_when_relay_domains_is_empty(tmp_path: Path, dns_server: DnsServer) -> None:
    proxy = ProxyProcess(
        tmp_path,
        {
            "backend": "maildir:mail",
            "relay_domains": [],
            "spf": {"enabled": False},
            "log": {"format": "json", "level": "info"},
            "dns": {"reverse_lookup": False, "nameservers": [dns_server.address], "timeout": 3.0},
        },
    ).start()
    try:
        (warning,) = log_lines(proxy, "relay_domains is empty")
        (line,) = log_lines(proxy, "listening")
    finally:
        assert proxy.stop() == 0
    assert warning["level"] == "warning"
    assert warning["msg"] == "relay_domains is empty: every recipient will be refused with 550 5.7.1"
    assert line["relay_domains"] == 0
    assert line["checks"] == ["ratelimit", "relay", "limits", "dkim", "arc", "dmarc", "rules"]


# /readyz and DNS -------------------------------------------------------------------


async def fetch(url: str) -> tuple[int, str]:
    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=20) as resp:
                return resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode()

    return await asyncio.to_thread(get)


@pytest.fixture
def silent_nameserver() -> Iterator[str]:
    """A UDP port that takes queries and never answers: a nameserver that does not answer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield f"127.0.0.1:{sock.getsockname()[1]}"


async def test_readyz_503_while_no_nameserver_answers(
    backend: RecordingBackend, start_proxy: Any, silent_nameserver: str
) -> None:
    # The probe waits for the timeout on purpose: 1 s split over the two servers.
    proxy = await start_proxy({"dns": {"nameservers": [silent_nameserver, "127.0.0.1:9"], "timeout": 1.0}})
    status, body = await fetch(proxy.metrics_url + "/readyz")
    assert status == 503
    assert body.startswith("DNS: no nameserver answers: ")
    assert f"{silent_nameserver} timed out" in body
    assert (await fetch(proxy.metrics_url + "/healthz"))[0] == 200  # alive, only not ready


async def test_readyz_200_with_the_dns_test_server_and_probes_are_cached(
    backend: RecordingBackend, start_proxy: Any
) -> None:
    with DnsServer({}) as dns:
        proxy = await start_proxy({"dns": {"nameservers": [dns.address]}})
        assert await fetch(proxy.metrics_url + "/readyz") == (200, "ready\n")
        assert await fetch(proxy.metrics_url + "/readyz") == (200, "ready\n")
        assert dns.count("", "NS") == 1  # the second answer came from the cache


async def test_a_nameserver_answering_servfail_is_answering(
    backend: RecordingBackend, start_proxy: Any
) -> None:
    with DnsServer({"": "SERVFAIL"}) as dns:
        proxy = await start_proxy({"dns": {"nameservers": [dns.address]}})
        assert await fetch(proxy.metrics_url + "/readyz") == (200, "ready\n")
        assert dns.count("", "NS") == 1


def test_readyz_of_several_workers_asks_dns_too(tmp_path: Path, silent_nameserver: str) -> None:
    proxy = ProxyProcess(
        tmp_path,
        {
            "backend": "maildir:mail",
            "relay_domains": ["example.org"],
            "workers": 2,
            "dns": {"reverse_lookup": False, "nameservers": [silent_nameserver], "timeout": 1.0},
        },
    ).start()
    try:
        url = f"http://127.0.0.1:{proxy.metrics_port}/readyz"
        try:
            with urllib.request.urlopen(url, timeout=20) as resp:
                status, body = resp.status, resp.read().decode()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read().decode()
    finally:
        assert proxy.stop() == 0
    assert status == 503, body
    assert body == f"DNS: no nameserver answers: {silent_nameserver} timed out\n"
