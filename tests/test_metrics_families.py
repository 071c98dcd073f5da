"""Every metric family moves when its event happens, through a running proxy; label sets stay bounded."""

from __future__ import annotations

import asyncio
import random
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

import smtpproxy
from smtpproxy.metrics import Metrics
from tests.backends import RecordingBackend
from tests.dnsserver import DnsServer
from tests.smtpclient import RawClient, make_message

ZONE: dict[str, Any] = {
    "sender.example": [("TXT", "v=spf1 ip4:127.0.0.0/8 ip4:10.0.0.0/8 -all"), ("A", "192.0.2.10")],
    "_dmarc.sender.example": [("TXT", "v=DMARC1; p=none")],
    "host.sender.example": [("A", "192.0.2.20")],
    "strict.example": [("TXT", "v=spf1 -all")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject")],
}

Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(dict(ZONE), ttl=300) as server:
        yield server


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        body: bytes = resp.read()
    return body.decode()


async def scrape(proxy: Any) -> Series:
    """Every sample on /metrics, keyed by name and labels (fetched in a thread: the proxy runs here)."""
    text = await asyncio.to_thread(_get, proxy.metrics_url + "/metrics")
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(series: Series, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in series.items() if n == name and want <= set(lab))


async def settle(proxy: Any) -> None:
    """Let connection_lost bookkeeping (a task spawned by the server) run."""
    for _ in range(50):
        if not proxy.app.connections:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)


async def one_message(proxy: Any, mail_from: str, rcpts: list[str], subject: str = "m") -> int:
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        reply = await c.send_message(mail_from, rcpts, make_message(subject))
        await c.cmd("QUIT")
    return reply.code


def conf(dns: DnsServer, **extra: Any) -> dict[str, Any]:
    return {"dns": {"nameservers": [dns.address], "timeout": 1.0}, **extra}


async def test_connections_accepted_active_and_duration(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns))
    before = await scrape(proxy)
    assert value(before, "smtpproxy_connections_active") == 0
    c = RawClient(proxy.host, proxy.port)
    await c.connect()
    during = await scrape(proxy)
    assert value(during, "smtpproxy_connections_active") == 1
    await c.cmd("QUIT")
    await c.close()
    await settle(proxy)
    after = await scrape(proxy)
    assert value(after, "smtpproxy_connections_active") == 0
    assert value(after, "smtpproxy_connections_total", tls="plain") == 1
    assert value(after, "smtpproxy_connections_total", tls="tls") == 0
    assert value(after, "smtpproxy_connection_duration_seconds_count") == 1


async def test_connection_over_the_limit_is_refused_and_counted(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns, limits={"max_connections": 1}))
    async with RawClient(proxy.host, proxy.port) as first:
        assert (await first.connect()).code == 220
        async with RawClient(proxy.host, proxy.port) as second:
            assert (await second.connect()).code == 421
        series = await scrape(proxy)
        assert value(series, "smtpproxy_connections_rejected_total", reason="max_connections") == 1
        assert value(series, "smtpproxy_connections_active") == 1


async def test_messages_by_action_stage_and_reason(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns))
    assert await one_message(proxy, "a@sender.example", ["user@example.org"]) == 250
    backend.data_reply = "554 5.6.0 no"
    assert await one_message(proxy, "a@sender.example", ["user@example.org"]) == 554
    backend.data_reply = "451 4.3.0 later"
    assert await one_message(proxy, "a@sender.example", ["user@example.org"]) == 451
    backend.data_reply = None
    # Relay denied at RCPT: DATA never comes; the client's QUIT ends the transaction.
    assert await one_message(proxy, "a@sender.example", ["x@elsewhere.test"]) == 550
    await settle(proxy)
    s = await scrape(proxy)
    assert value(s, "smtpproxy_messages_total", action="delivered", stage="data", reason="clean") == 1
    assert value(s, "smtpproxy_messages_total", action="rejected", stage="data", reason="backend") == 1
    assert value(s, "smtpproxy_messages_total", action="tempfailed", stage="data", reason="backend") == 1
    assert value(s, "smtpproxy_messages_total", action="aborted", stage="quit") == 1
    assert value(s, "smtpproxy_messages_total") == 4


async def test_recipients_by_outcome(backend: RecordingBackend, start_proxy: Any, dns: DnsServer) -> None:
    proxy = await start_proxy(conf(dns))
    backend.rcpt_replies["gone@example.org"] = "550 5.1.1 no"
    backend.rcpt_replies["full@example.org"] = "452 4.2.2 mailbox full"
    rcpts = ["user@example.org", "gone@example.org", "full@example.org", "x@elsewhere.test"]
    assert await one_message(proxy, "a@sender.example", rcpts) == 250
    s = await scrape(proxy)
    assert value(s, "smtpproxy_recipients_total", outcome="accepted") == 1
    assert value(s, "smtpproxy_recipients_total", outcome="rejected") == 2  # backend 550 and relay denied
    assert value(s, "smtpproxy_recipients_total", outcome="tempfailed") == 1


async def test_message_size_and_processing_durations(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns))
    assert await one_message(proxy, "a@sender.example", ["user@example.org"], subject="sized") == 250
    await settle(proxy)
    s = await scrape(proxy)
    size = len(make_message("sized"))
    assert value(s, "smtpproxy_message_size_bytes_count") == 1
    assert value(s, "smtpproxy_message_size_bytes_sum") == pytest.approx(size, abs=2)
    assert value(s, "smtpproxy_message_size_bytes_bucket", le="1024.0") == 1
    assert value(s, "smtpproxy_data_duration_seconds_count") == 1
    # Stages without a registered check are skipped, not timed; these always have one.
    for stage in ("mail", "rcpt", "data"):
        assert value(s, "smtpproxy_stage_duration_seconds_count", stage=stage) >= 1, stage
    # Checks doing I/O are timed one by one; pure ones (relay, limits) only within their stage.
    timed = {c.name for c in proxy.app.checks if c.timed}
    assert {"spf", "dkim", "dmarc", "rules"} <= timed
    for name in timed:
        assert ("smtpproxy_check_duration_seconds_count", (("check", name),)) in s, name
    assert value(s, "smtpproxy_check_duration_seconds_count", check="spf") >= 1


async def test_backend_replies_latency_and_pool(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns))
    backend.rcpt_replies["gone@example.org"] = "550 5.1.1 no"
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<a@sender.example>")).code == 250
        mid = await scrape(proxy)
        assert value(mid, "smtpproxy_backend_pool_in_use") == 1
        assert value(mid, "smtpproxy_backend_pool_connections") == 1
        assert value(mid, "smtpproxy_backend_up") == 1
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
        assert (await c.cmd("RCPT TO:<gone@example.org>")).code == 550
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(make_message() + b".")).code == 250
        await c.cmd("QUIT")
    await settle(proxy)
    s = await scrape(proxy)
    assert value(s, "smtpproxy_backend_replies_total", command="mail", **{"class": "2xx"}) == 1
    assert value(s, "smtpproxy_backend_replies_total", command="rcpt", **{"class": "2xx"}) == 1
    assert value(s, "smtpproxy_backend_replies_total", command="rcpt", **{"class": "5xx"}) == 1
    assert value(s, "smtpproxy_backend_replies_total", command="data", **{"class": "2xx"}) == 1
    for command in ("mail", "rcpt", "data"):
        assert value(s, "smtpproxy_backend_latency_seconds_count", command=command) >= 1, command
    assert value(s, "smtpproxy_backend_pool_in_use") == 0
    assert value(s, "smtpproxy_backend_pool_connections") == 1  # kept idle for the next transaction
    assert value(s, "smtpproxy_backend_errors_total") == 0


async def test_backend_connect_error_is_counted_and_marks_it_down(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns))
    await backend.stop()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        reply = await c.cmd("MAIL FROM:<a@sender.example>")
        assert 400 <= reply.code < 500, reply
    s = await scrape(proxy)
    assert value(s, "smtpproxy_backend_errors_total", kind="connect") >= 1
    assert value(s, "smtpproxy_backend_up") == 0
    assert value(s, "smtpproxy_messages_total", action="tempfailed", stage="mail", reason="backend") == 1


async def test_authentication_results_by_method(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns))
    assert await one_message(proxy, "a@sender.example", ["user@example.org"]) == 250
    s = await scrape(proxy)
    assert value(s, "smtpproxy_auth_results_total", method="spf", result="pass") == 1
    assert value(s, "smtpproxy_auth_results_total", method="dkim", result="none") == 1
    assert value(s, "smtpproxy_auth_results_total", method="dmarc") == 1


async def test_dns_queries_cache_and_latency(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns))
    resolver = proxy.app.resolver
    before = await scrape(proxy)
    await resolver.query("host.sender.example", "A")
    await resolver.query("host.sender.example", "A")
    await resolver.query("missing.sender.example", "A")
    s = await scrape(proxy)

    def moved(name: str, **labels: str) -> float:
        return value(s, name, **labels) - value(before, name, **labels)

    assert moved("smtpproxy_dns_queries_total", type="A", outcome="ok") == 1
    assert moved("smtpproxy_dns_queries_total", type="A", outcome="nxdomain") == 1
    assert moved("smtpproxy_dns_cache_lookups_total", result="miss") == 2
    assert moved("smtpproxy_dns_cache_lookups_total", result="hit") == 1
    assert moved("smtpproxy_dns_latency_seconds_count", type="A") == 2


async def test_protocol_errors_by_kind(backend: RecordingBackend, start_proxy: Any, dns: DnsServer) -> None:
    proxy = await start_proxy(conf(dns))
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.cmd("FROBNICATE")).code == 500
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 503
    s = await scrape(proxy)
    assert value(s, "smtpproxy_protocol_errors_total", kind="invalid_command") == 1
    assert value(s, "smtpproxy_protocol_errors_total", kind="syntax") == 1


async def test_rule_hits_reloads_and_loaded(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer, tmp_path: Path
) -> None:
    rules = tmp_path / "metric-rules"
    rules.mkdir()
    (rules / "10-hello.yaml").write_text(
        "rules:\n  - name: subject_hello\n    if:\n      subject: {regex: 'hello'}\n    then: {score: 1.0}\n"
    )
    proxy = await start_proxy(conf(dns, rules=str(rules)))
    assert await one_message(proxy, "a@sender.example", ["user@example.org"], subject="hello there") == 250
    assert await one_message(proxy, "a@sender.example", ["user@example.org"], subject="other") == 250
    s = await scrape(proxy)
    assert value(s, "smtpproxy_rule_hits_total", rule="subject_hello") == 1
    assert value(s, "smtpproxy_rules_loaded") == 1
    assert value(s, "smtpproxy_rule_reloads_total", outcome="success") == 1
    assert value(s, "smtpproxy_rules_last_reload_timestamp_seconds") > 1_600_000_000
    (rules / "10-hello.yaml").write_text("rules: [oops\n")
    assert proxy.app.rules.reload() is False
    s = await scrape(proxy)
    assert value(s, "smtpproxy_rule_reloads_total", outcome="failure") == 1
    assert value(s, "smtpproxy_rules_loaded") == 1  # the old rules keep running


async def test_ratelimit_hits_by_limit_name(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    limit = {"name": "per_sender", "key": "sender", "rate": "1/hour", "on": "mail"}
    proxy = await start_proxy(conf(dns, ratelimits=[limit]))
    assert await one_message(proxy, "a@sender.example", ["user@example.org"]) == 250
    assert await one_message(proxy, "a@sender.example", ["user@example.org"]) == 450
    s = await scrape(proxy)
    assert value(s, "smtpproxy_ratelimit_hits_total", limit="per_sender") == 1
    assert value(s, "smtpproxy_ratelimit_store_errors_total") == 0


async def test_session_limit_hits_by_limit_name(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns, session_limits={"max_invalid_commands": 1}))
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.cmd("FROBNICATE")).code == 500
        assert (await c.cmd("FROBNICATE")).code == 421
    s = await scrape(proxy)
    assert value(s, "smtpproxy_session_limit_hits_total", limit="max_invalid_commands") == 1


async def test_dmarc_policy_applied(backend: RecordingBackend, start_proxy: Any, dns: DnsServer) -> None:
    proxy = await start_proxy(conf(dns))
    message = (
        b"From: <x@strict.example>\r\nTo: <user@example.org>\r\nSubject: spoof\r\n"
        b"Message-ID: <spoof@strict.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n\r\nhi\r\n"
    )
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        reply = await c.send_message("x@strict.example", ["user@example.org"], message)
    assert reply.code == 550, reply
    s = await scrape(proxy)
    assert value(s, "smtpproxy_auth_results_total", method="spf", result="fail") == 1
    assert value(s, "smtpproxy_auth_results_total", method="dmarc", result="fail") == 1
    assert value(s, "smtpproxy_dmarc_policy_applied_total", policy="reject", enforced="true") == 1


async def test_build_info_and_process_collector(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(conf(dns))
    s = await scrape(proxy)
    assert value(s, "smtpproxy_build_info", version=smtpproxy.__version__) == 1
    assert value(s, "process_resident_memory_bytes") > 0
    assert value(s, "process_cpu_seconds_total") > 0
    assert value(s, "process_open_fds") > 0


# -- cardinality ---------------------------------------------------------------------------

MESSAGES = 1000
WORKERS = 20


async def _proxied_message(proxy: Any, n: int) -> int:
    """One connection through the PROXY protocol from client 10.x.y.z, one message from a new sender."""
    ip = f"10.{n // 65536 % 256}.{n // 256 % 256}.{n % 256 or 1}"
    async with RawClient(proxy.host, proxy.port) as c:
        c.reader, c.writer = await asyncio.open_connection(proxy.host, proxy.port)
        await c.send(f"PROXY TCP4 {ip} 192.0.2.1 {1024 + n} 25\r\n".encode())
        banner = await c.reply()
        assert banner.code == 220, banner
        reply = await c.send_message(f"user{n}@sender.example", ["user@example.org"], make_message(f"n{n}"))
        await c.cmd("QUIT")
    return reply.code


async def test_series_count_does_not_grow_with_clients_and_senders(
    backend: RecordingBackend, start_proxy: Any, dns: DnsServer
) -> None:
    proxy = await start_proxy(
        conf(dns, proxy_protocol={"trusted_networks": ["127.0.0.0/8"]}, limits={"max_connections": 100})
    )
    codes = [await _proxied_message(proxy, n) for n in range(1, 6)]
    assert codes == [250] * 5
    await settle(proxy)
    early = set(await scrape(proxy))

    numbers = list(range(6, MESSAGES + 1))
    random.Random(6).shuffle(numbers)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for n in numbers:
        queue.put_nowait(n)
    results: list[int] = []

    async def worker() -> None:
        while not queue.empty():
            results.append(await _proxied_message(proxy, queue.get_nowait()))

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(WORKERS))), 120)
    await settle(proxy)
    assert results.count(250) == len(numbers), sorted(set(results))
    late = await scrape(proxy)
    assert value(late, "smtpproxy_messages_total", action="delivered") == MESSAGES
    assert value(late, "smtpproxy_connections_total") == MESSAGES
    assert len(backend.messages) == MESSAGES
    grown = sorted(set(late) - early)
    assert not grown, f"{len(grown)} new series after the first messages, e.g. {grown[:5]}"


def test_memoized_labels_reach_the_same_series() -> None:
    m = Metrics(process=False)
    hit = m.dns_cache.labels(result="hit")
    assert m.dns_cache.labels(result="hit") is hit
    assert m.dns_cache.labels("hit") is hit  # positional: another memo key, the same child
    hit.inc()
    m.dns_cache.labels("hit").inc()
    m.dns_cache.labels(result="miss").inc()
    sample = m.registry.get_sample_value
    assert sample("smtpproxy_dns_cache_lookups_total", {"result": "hit"}) == 2
    assert sample("smtpproxy_dns_cache_lookups_total", {"result": "miss"}) == 1
    with pytest.raises(ValueError):
        m.dns_cache.labels("a", "b")  # the library's own checks still apply to a new label set
