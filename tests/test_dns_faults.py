"""DNS faults through the running proxy: the right reply, nothing half-delivered, recovery, a metric moved."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.backends import RecordingBackend
from tests.dnsserver import DnsServer
from tests.smtpclient import RawClient, make_message

DOMAIN = "flaky.example"


@pytest.fixture
def flaky_dns() -> Iterator[DnsServer]:
    server = DnsServer({DOMAIN: [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")]})
    server.start()
    yield server
    server.stop()


def _message() -> bytes:
    return make_message().replace(b"sender@sender.example", f"alice@{DOMAIN}".encode())


async def _send(proxy) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    async with RawClient(proxy.host, proxy.port, timeout=15) as c:
        await c.connect()
        r = await c.send_message(f"alice@{DOMAIN}", ["user@example.org"], _message())
        return r.code, r.text


@pytest.mark.parametrize(
    ("fault", "code", "enhanced", "outcome"),
    [
        ("TIMEOUT", 451, "4.4.3", "timeout"),
        ("SERVFAIL", 451, "4.4.3", "servfail"),
    ],
)
async def test_dns_failure_tempfails_then_recovers(
    flaky_dns: DnsServer,
    backend: RecordingBackend,
    start_proxy,
    fault: str,
    code: int,
    enhanced: str,
    outcome: str,
) -> None:
    flaky_dns.set(f"_dmarc.{DOMAIN}", fault)
    proxy = await start_proxy({"dns": {"nameservers": [flaky_dns.address], "timeout": 2.0}})
    got, text = await _send(proxy)
    assert (got, text[:5]) == (code, enhanced), text
    assert backend.messages == []
    assert proxy.app.metrics.dns_queries.labels("TXT", outcome)._value.get() >= 1
    flaky_dns.set(f"_dmarc.{DOMAIN}", [("TXT", "v=DMARC1; p=reject")])
    got, text = await _send(proxy)
    assert got == 250, text
    assert len(backend.messages) == 1


async def test_truncated_answer_falls_back_to_tcp(
    flaky_dns: DnsServer, backend: RecordingBackend, start_proxy
) -> None:
    flaky_dns.set(f"_dmarc.{DOMAIN}", [("TRUNCATE", ""), ("TXT", "v=DMARC1; p=reject")])
    proxy = await start_proxy({"dns": {"nameservers": [flaky_dns.address], "timeout": 2.0}})
    got, text = await _send(proxy)
    assert got == 250, text
    assert b"dmarc=pass" in backend.messages[0].content


async def test_absurd_txt_records_are_a_result_not_a_crash(
    flaky_dns: DnsServer, backend: RecordingBackend, start_proxy
) -> None:
    flaky_dns.set(
        f"_dmarc.{DOMAIN}",
        [("TXT", "v=DMARC1; p=" + "x" * 200), ("TXT", "\x00\x01 garbage"), ("TXT", "v=DMARC1;" + ";" * 200)],
    )
    flaky_dns.set(DOMAIN, [("TXT", "v=spf1 " + "include:a.b " * 60 + "-all"), ("TXT", "v=spf1 -all")])
    proxy = await start_proxy({"dns": {"nameservers": [flaky_dns.address], "timeout": 2.0}})
    got, text = await _send(proxy)
    # Two SPF records: permerror; several DMARC records: no DMARC: the message is delivered.
    assert got == 250, text
    head = backend.messages[0].content.split(b"\r\n\r\n")[0]
    assert b"spf=permerror" in head
    assert proxy.app.metrics.check_errors.labels("spf", "error")._value.get() == 0
