"""The shared resolver against a real DNS server on loopback (tests/dnsserver.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest

from smtpproxy.dns import MAX_TTL, DnsAnswer, Resolver
from smtpproxy.metrics import Metrics
from tests.dnsserver import DnsServer

ZONE: dict[str, list[tuple[str, object]] | str] = {
    "example.org": [
        ("A", "192.0.2.1"),
        ("AAAA", "2001:db8::1"),
        ("TXT", "v=spf1 ip4:192.0.2.0/24 -all"),
        ("MX", "10 MX.Example.org"),
        ("MX", "20 backup.example.org"),
        ("NS", "ns1.example.org"),
    ],
    "alias.example.org": [("CNAME", "example.org")],
    "1.2.0.192.in-addr.arpa": [("PTR", "mail.example.org")],
    "mail.example.org": [("A", "192.0.2.1")],
    "2.2.0.192.in-addr.arpa": [("PTR", "liar.example.org")],
    "liar.example.org": [("A", "198.51.100.7")],
    "1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa": [("PTR", "v6.example.org")],
    "v6.example.org": [("AAAA", "2001:db8::1")],
    "split.example.org": [("TXT", ["v=DKIM1; ", "k=rsa; ", "p=ABC"])],
    "long.example.org": [("TXT", "p=" + "A" * 600)],
    "binary.example.org": [("TXT", [b"v=spf1 \xff\xfe -all"])],
    "big.example.org": [("TXT", "x" * 200), ("TXT", "y" * 200), ("TXT", "z" * 200)],
    "tc.example.org": [("A", "192.0.2.55"), ("TRUNCATE", "")],
    "slow.example.org": "TIMEOUT",
    "broken.example.org": "SERVFAIL",
}


class FakeClock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer(dict(ZONE), ttl=60) as srv:
        yield srv


@pytest.fixture
def metrics() -> Metrics:
    return Metrics(process=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def resolver(server: DnsServer, metrics: Metrics, clock: FakeClock) -> Resolver:
    return Resolver([server.address], timeout=2.0, metrics=metrics, clock=clock)


def sample(metrics: Metrics, name: str, labels: dict[str, str]) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


async def test_a_and_aaaa_records(resolver: Resolver) -> None:
    a = await resolver.a("example.org")
    aaaa = await resolver.aaaa("example.org")
    assert (a.status, a.records, a.ttl) == ("ok", ("192.0.2.1",), 60)
    assert (aaaa.status, aaaa.records) == ("ok", ("2001:db8::1",))
    assert a.ok and not a.is_temporary_error


async def test_mx_records_are_preference_and_lowercase_host(resolver: Resolver) -> None:
    mx = await resolver.mx("example.org")
    assert sorted(mx.records) == ["10 mx.example.org", "20 backup.example.org"]


async def test_ns_and_cname_records(resolver: Resolver) -> None:
    ns = await resolver.query("example.org", "NS")
    cname = await resolver.query("alias.example.org", "CNAME")
    assert ns.records == ("ns1.example.org",)
    assert cname.records == ("example.org",)


async def test_a_through_cname_gives_the_target_address(resolver: Resolver) -> None:
    answer = await resolver.a("alias.example.org")
    assert (answer.status, answer.records) == ("ok", ("192.0.2.1",))


async def test_ptr_by_address(resolver: Resolver) -> None:
    answer = await resolver.ptr("192.0.2.1")
    assert answer.records == ("mail.example.org",)
    assert (await resolver.ptr("not an ip")).status == "error"


async def test_txt_strings_are_joined_and_kept_exact(resolver: Resolver) -> None:
    answer = await resolver.txt("split.example.org")
    assert answer.records == ("v=DKIM1; k=rsa; p=ABC",)
    assert answer.txt_strings == ((b"v=DKIM1; ", b"k=rsa; ", b"p=ABC"),)


async def test_long_txt_is_split_in_255_byte_strings_and_rejoined(resolver: Resolver) -> None:
    answer = await resolver.txt("long.example.org")
    assert answer.records == ("p=" + "A" * 600,)
    assert [len(s) for s in answer.txt_strings[0]] == [255, 255, 92]


async def test_invalid_utf8_txt_is_replaced_in_text_but_exact_in_bytes(resolver: Resolver) -> None:
    answer = await resolver.txt("binary.example.org")
    assert answer.records == ("v=spf1 \ufffd\ufffd -all",)
    assert answer.txt_strings == ((b"v=spf1 \xff\xfe -all",),)


async def test_nxdomain_and_nodata(resolver: Resolver) -> None:
    nx = await resolver.a("nowhere.example.org")
    nodata = await resolver.query("mail.example.org", "TXT")
    assert (nx.status, nx.records) == ("nxdomain", ())
    assert (nodata.status, nodata.records) == ("nodata", ())
    assert not nx.is_temporary_error and not nodata.is_temporary_error


async def test_servfail_is_a_temporary_error(resolver: Resolver) -> None:
    answer = await resolver.a("broken.example.org")
    assert answer.status == "servfail" and answer.is_temporary_error


async def test_timeout_is_bounded_and_temporary(server: DnsServer, metrics: Metrics) -> None:
    resolver = Resolver([server.address], timeout=0.2, metrics=metrics)
    answer = await resolver.a("slow.example.org")
    assert answer.status == "timeout" and answer.is_temporary_error
    assert sample(metrics, "smtpproxy_dns_queries_total", {"type": "A", "outcome": "timeout"}) == 1


async def test_truncated_udp_answer_is_retried_over_tcp(resolver: Resolver, server: DnsServer) -> None:
    answer = await resolver.a("tc.example.org")
    assert answer.records == ("192.0.2.55",)
    assert server.count("tc.example.org", "A") == 2  # once over UDP (TC), once over TCP


async def test_answer_too_big_for_udp_comes_over_tcp(resolver: Resolver) -> None:
    answer = await resolver.txt("big.example.org")
    assert sorted(answer.records) == ["x" * 200, "y" * 200, "z" * 200]


async def test_second_lookup_is_served_from_cache(
    resolver: Resolver, server: DnsServer, metrics: Metrics
) -> None:
    first = await resolver.txt("example.org")
    second = await resolver.txt("EXAMPLE.org.")
    assert first.records == second.records
    assert server.count("example.org", "TXT") == 1
    assert sample(metrics, "smtpproxy_dns_cache_lookups_total", {"result": "hit"}) == 1
    assert sample(metrics, "smtpproxy_dns_cache_lookups_total", {"result": "miss"}) == 1


async def test_cached_answer_reports_remaining_ttl_and_expires(
    resolver: Resolver, server: DnsServer, clock: FakeClock
) -> None:
    await resolver.a("example.org")
    clock.now += 45
    assert (await resolver.a("example.org")).ttl == 15
    assert server.count("example.org", "A") == 1
    clock.now += 16
    await resolver.a("example.org")
    assert server.count("example.org", "A") == 2


async def test_changed_zone_data_is_seen_after_expiry(
    resolver: Resolver, server: DnsServer, clock: FakeClock
) -> None:
    assert (await resolver.a("mail.example.org")).records == ("192.0.2.1",)
    server.set("mail.example.org", [("A", "192.0.2.99")])
    assert (await resolver.a("mail.example.org")).records == ("192.0.2.1",)
    clock.now += 61
    assert (await resolver.a("mail.example.org")).records == ("192.0.2.99",)


async def test_negative_answers_are_cached_by_soa_minimum(
    resolver: Resolver, server: DnsServer, clock: FakeClock
) -> None:
    first = await resolver.a("nowhere.example.org")
    await resolver.a("nowhere.example.org")
    await resolver.query("mail.example.org", "MX")
    await resolver.query("mail.example.org", "MX")
    assert first.ttl == 60
    assert server.count("nowhere.example.org") == 1
    assert server.count("mail.example.org", "MX") == 1
    clock.now += 61
    await resolver.a("nowhere.example.org")
    assert server.count("nowhere.example.org") == 2


async def test_temporary_errors_are_not_cached(resolver: Resolver, server: DnsServer) -> None:
    await resolver.a("broken.example.org")
    server.set("broken.example.org", [("A", "192.0.2.3")])
    assert (await resolver.a("broken.example.org")).records == ("192.0.2.3",)


async def test_ttl_is_capped(server: DnsServer) -> None:
    with DnsServer({"forever.example.org": [("A", "192.0.2.1")]}, ttl=10_000_000) as far:
        answer = await Resolver([far.address], timeout=2.0).a("forever.example.org")
    assert answer.ttl == MAX_TTL


async def test_cache_is_bounded_least_recently_used_first(server: DnsServer) -> None:
    resolver = Resolver([server.address], timeout=2.0, cache_size=2)
    await resolver.a("example.org")
    await resolver.a("mail.example.org")
    await resolver.a("example.org")  # now most recently used
    await resolver.a("liar.example.org")  # evicts mail.example.org
    await resolver.a("example.org")
    await resolver.a("mail.example.org")
    assert server.count("example.org", "A") == 1
    assert server.count("mail.example.org", "A") == 2


async def test_concurrent_identical_lookups_share_one_query(resolver: Resolver, server: DnsServer) -> None:
    answers = await asyncio.gather(*(resolver.txt("example.org") for _ in range(20)))
    assert {a.records for a in answers} == {("v=spf1 ip4:192.0.2.0/24 -all",)}
    assert server.count("example.org", "TXT") == 1


async def test_cancelled_caller_does_not_cancel_the_shared_lookup(resolver: Resolver) -> None:
    first = asyncio.create_task(resolver.a("example.org"))
    second = asyncio.create_task(resolver.a("example.org"))
    await asyncio.sleep(0)
    first.cancel()
    answer = await second
    assert answer.records == ("192.0.2.1",)
    assert first.cancelled()


async def test_slow_name_never_stalls_other_lookups(server: DnsServer) -> None:
    # The good answer must come before the slow one times out, even on a loaded machine.
    resolver = Resolver([server.address], timeout=3.0)
    slow = asyncio.create_task(resolver.a("slow.example.org"))
    await asyncio.sleep(0)
    good = await resolver.a("example.org")
    assert good.records == ("192.0.2.1",)
    assert not slow.done()  # the good answer arrived while the slow one was still pending
    assert (await slow).status == "timeout"


async def test_metrics_count_queries_by_type_and_outcome(resolver: Resolver, metrics: Metrics) -> None:
    await resolver.a("example.org")
    await resolver.a("nowhere.example.org")
    await resolver.query("mail.example.org", "TXT")
    await resolver.a("broken.example.org")
    q = "smtpproxy_dns_queries_total"
    assert sample(metrics, q, {"type": "A", "outcome": "ok"}) == 1
    assert sample(metrics, q, {"type": "A", "outcome": "nxdomain"}) == 1
    assert sample(metrics, q, {"type": "TXT", "outcome": "nodata"}) == 1
    assert sample(metrics, q, {"type": "A", "outcome": "servfail"}) == 1
    assert sample(metrics, "smtpproxy_dns_latency_seconds_count", {"type": "A"}) == 3


@pytest.mark.parametrize(
    ("name", "rdtype"),
    [
        ("", "A"),
        (".", "A"),
        ("a" * 64 + ".example.org", "A"),
        (".".join(["abcdefghi"] * 30), "A"),
        ("a..b.example.org", "TXT"),
        ("example.org", "NOSUCHTYPE"),
    ],
)
async def test_garbage_names_give_error_without_raising(resolver: Resolver, name: str, rdtype: str) -> None:
    answer = await resolver.query(name, rdtype)
    assert isinstance(answer, DnsAnswer)
    assert answer.status == "error" and answer.is_temporary_error


async def test_forward_confirmed_reverse_name(resolver: Resolver) -> None:
    assert await resolver.reverse_name("192.0.2.1") == "mail.example.org"
    assert await resolver.reverse_name("2001:db8::1") == "v6.example.org"


@pytest.mark.parametrize("ip", ["192.0.2.2", "192.0.2.200", "192.0.2.999", "", "2001:db8::dead"])
async def test_reverse_name_is_none_when_unconfirmed_missing_or_invalid(resolver: Resolver, ip: str) -> None:
    assert await resolver.reverse_name(ip) is None


async def test_reverse_name_is_none_on_dns_failure(server: DnsServer, resolver: Resolver) -> None:
    server.set("1.2.0.192.in-addr.arpa", "SERVFAIL")
    assert await resolver.reverse_name("192.0.2.1") is None


async def test_next_nameserver_is_tried_after_servfail(server: DnsServer) -> None:
    with DnsServer({"example.org": "SERVFAIL"}) as bad:
        resolver = Resolver([bad.address, server.address], timeout=4.0)  # 2 s per server
        answer = await resolver.a("example.org")
    assert answer.records == ("192.0.2.1",)
    assert bad.count("example.org") == 1


async def test_peek_reads_only_the_cache(resolver: Resolver, server: DnsServer) -> None:
    assert resolver.peek("example.org", "A") is None
    await resolver.a("example.org")
    peeked = resolver.peek("Example.org.", "a")
    assert peeked is not None and peeked.records == ("192.0.2.1",)
    assert server.count("example.org", "A") == 1


async def test_close_cancels_lookups_in_flight(server: DnsServer) -> None:
    resolver = Resolver([server.address], timeout=5.0)
    pending = asyncio.create_task(resolver.a("slow.example.org"))
    await asyncio.sleep(0.05)
    await resolver.close()
    with pytest.raises(asyncio.CancelledError):
        await pending


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"nameservers": []}, "at least one nameserver"),
        ({"nameservers": ["127.0.0.1:99999"]}, "port number"),
        ({"nameservers": ["127.0.0.1:53"], "timeout": 0}, "timeout > 0"),
        ({"nameservers": ["127.0.0.1:53"], "cache_size": 0}, "cache_size >= 1"),
    ],
)
def test_bad_constructor_arguments_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Resolver(**kwargs)  # type: ignore[arg-type]


def test_system_nameservers_when_none_given() -> None:
    assert Resolver(None).timeout == 2.0
