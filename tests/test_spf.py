"""SPF evaluation (SpfChecker) and the pipeline check (SpfCheck) against a real DNS server."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterator

import pytest

from smtpproxy.auth.results import spf_result
from smtpproxy.auth.spf import SpfCheck, SpfChecker, SpfResult, build_spf_check, sanitize
from smtpproxy.config import ConfigError, SpfConfig, build_config
from smtpproxy.dns import Resolver
from smtpproxy.metrics import Metrics
from smtpproxy.session import CheckResult, Session, Transaction
from smtpproxy.verdict import Action, Verdict
from tests.dnsserver import DnsServer, ZoneValue

ZONE: dict[str, ZoneValue] = {
    "pass.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
    "fail.example": [("TXT", "v=spf1 -all exp=why.fail.example")],
    "why.fail.example": [("TXT", "%{i} is not one of %{d}'s\r\nX-Injected: yes\x00 servers")],
    "soft.example": [("TXT", "v=spf1 ~all")],
    "neutral.example": [("TXT", "v=spf1 ?all")],
    "nospf.example": [("TXT", "just some text"), ("A", "192.0.2.1")],
    "syntax.example": [("TXT", "v=spf1 ip4:192.0.2.300 -all")],
    "broken.example": "SERVFAIL",
    "slow.example": [("TXT", "v=spf1 a:hang.slow.example -all")],
    "hang.slow.example": "TIMEOUT",
    "mx.example": [("TXT", "v=spf1 mx -all"), ("MX", "10 mx1.mx.example"), ("MX", "20 mx2.mx.example")],
    "mx1.mx.example": [("A", "198.51.100.1")],
    "mx2.mx.example": [("A", "192.0.2.7")],
    "six.example": [("TXT", "v=spf1 ip6:2001:db8::/32 -all")],
    "helo.example": [("TXT", "v=spf1 a -all"), ("A", "192.0.2.9")],
    "void.example": [("TXT", "v=spf1 a:n1.void.example a:n2.void.example a:n3.void.example -all")],
    "include.example": [("TXT", "v=spf1 include:pass.example -all")],
    "ptr.example": [("TXT", "v=spf1 ptr -all")],
    "9.2.0.192.in-addr.arpa": [("PTR", "host.ptr.example")],
    "host.ptr.example": [("A", "192.0.2.9")],
    "ptrfail.example": [("TXT", "v=spf1 ptr ?all")],
    "10.2.0.192.in-addr.arpa": "SERVFAIL",
}
# Eleven DNS-querying terms: one more than RFC 7208 §4.6.4 allows.
ZONE["limit.example"] = [("TXT", "v=spf1 " + " ".join(f"a:h{i}.limit.example" for i in range(11)) + " -all")]
for i in range(11):
    ZONE[f"h{i}.limit.example"] = [("A", "198.51.100.99")]


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer(dict(ZONE)) as srv:
        yield srv


@pytest.fixture
def resolver(server: DnsServer) -> Resolver:
    return Resolver([server.address], timeout=2.0)


@pytest.fixture
def checker(resolver: Resolver) -> SpfChecker:
    return SpfChecker(resolver)


@pytest.mark.parametrize(
    ("mail_from", "ip", "result"),
    [
        ("alice@pass.example", "192.0.2.10", "pass"),
        ("alice@pass.example", "203.0.113.5", "fail"),
        ("bob@soft.example", "192.0.2.10", "softfail"),
        ("bob@neutral.example", "192.0.2.10", "neutral"),
        ("carol@nospf.example", "192.0.2.10", "none"),
        ("carol@nowhere.example", "192.0.2.10", "none"),
        ("dave@syntax.example", "192.0.2.10", "permerror"),
        ("erin@broken.example", "192.0.2.10", "temperror"),
        ("frank@include.example", "192.0.2.10", "pass"),
        ("frank@include.example", "203.0.113.5", "fail"),
        ("gina@six.example", "2001:db8::25", "pass"),
        ("gina@six.example", "2001:db9::25", "fail"),
        ("henk@ptr.example", "192.0.2.9", "pass"),
        ("henk@ptr.example", "192.0.2.8", "fail"),
    ],
)
async def test_results(checker: SpfChecker, mail_from: str, ip: str, result: str) -> None:
    res = await checker.check(ip, mail_from, "client.example")
    assert res.result == result
    assert res.identity == "mailfrom"
    assert res.domain == mail_from.split("@")[1]
    assert res.sender == mail_from


async def test_mx_mechanism_looks_up_every_exchange_once(checker: SpfChecker, server: DnsServer) -> None:
    assert (await checker.check("192.0.2.7", "x@mx.example", "h")).result == "pass"
    assert (await checker.check("192.0.2.8", "x@mx.example", "h")).result == "fail"
    assert server.count("mx1.mx.example", "A") == 1
    assert server.count("mx2.mx.example", "A") == 1
    assert server.count("mx.example", "MX") == 1


async def test_warm_cache_evaluation_sends_no_queries(checker: SpfChecker, server: DnsServer) -> None:
    await checker.check("192.0.2.7", "x@mx.example", "h")
    before = len(server.queries)
    again = await checker.check("192.0.2.7", "y@mx.example", "h")
    assert again.result == "pass"
    assert len(server.queries) == before


async def test_null_sender_checks_the_helo_identity(checker: SpfChecker) -> None:
    res = await checker.check("192.0.2.9", "", "helo.example")
    assert res == SpfResult(
        "pass",
        "helo.example",
        "helo",
        "postmaster@helo.example",
        "sender SPF authorized",
        "domain of helo.example designates 192.0.2.9 as permitted sender",
    )
    assert (await checker.check("192.0.2.10", "", "helo.example")).result == "fail"


@pytest.mark.parametrize("helo", ["", "[192.0.2.9]", "localhost"])
async def test_null_sender_with_unusable_helo_is_none(checker: SpfChecker, helo: str) -> None:
    res = await checker.check("192.0.2.9", "", helo)
    assert res.result == "none" and res.identity == "helo"


async def test_sender_without_local_part_is_postmaster(checker: SpfChecker) -> None:
    res = await checker.check("192.0.2.10", "@pass.example", "h")
    assert (res.result, res.sender) == ("pass", "postmaster@pass.example")


async def test_fail_explanation_from_exp_is_sanitised(checker: SpfChecker) -> None:
    res = await checker.check("203.0.113.5", "x@fail.example", "h")
    assert res.result == "fail"
    assert res.explanation == "203.0.113.5 is not one of fail.example's X-Injected: yes servers"
    assert all(32 <= ord(c) < 127 for c in res.explanation + res.comment)


async def test_more_than_ten_lookups_is_permerror(checker: SpfChecker) -> None:
    res = await checker.check("192.0.2.10", "x@limit.example", "h")
    assert res.result == "permerror"
    assert "Too many DNS lookups" in res.explanation


async def test_more_than_two_void_lookups_is_permerror(checker: SpfChecker) -> None:
    res = await checker.check("192.0.2.10", "x@void.example", "h")
    assert res.result == "permerror"
    assert "Void lookup limit" in res.explanation


async def test_ptr_lookup_error_means_no_match(checker: SpfChecker) -> None:
    # RFC 7208 §5.5: a DNS error during the PTR lookup makes "ptr" not match (not temperror).
    assert (await checker.check("192.0.2.10", "x@ptrfail.example", "h")).result == "neutral"


async def test_dns_timeout_is_temperror(checker: SpfChecker) -> None:
    res = await checker.check("192.0.2.10", "x@slow.example", "h")
    assert res.result == "temperror"


async def test_whole_evaluation_is_bounded_by_its_timeout(server: DnsServer) -> None:
    checker = SpfChecker(Resolver([server.address], timeout=30.0), timeout=0.2)
    res = await checker.check("192.0.2.10", "x@slow.example", "h")
    assert (res.result, res.explanation) == ("temperror", "SPF evaluation timed out")


async def test_slow_evaluation_does_not_stall_others(server: DnsServer) -> None:
    # The fast check must finish before the slow one times out, even on a loaded machine.
    checker = SpfChecker(Resolver([server.address], timeout=3.0))
    slow = asyncio.create_task(checker.check("192.0.2.10", "x@slow.example", "h"))
    await asyncio.sleep(0)
    fast = await checker.check("192.0.2.10", "x@pass.example", "h")
    assert fast.result == "pass"
    assert not slow.done()
    assert (await slow).result == "temperror"


@pytest.mark.parametrize("ip", ["not-an-ip", "999.1.1.1", ""])
async def test_bad_client_address_is_permerror_not_an_exception(checker: SpfChecker, ip: str) -> None:
    res = await checker.check(ip, "x@pass.example", "h")
    assert (res.result, res.explanation) == ("permerror", "invalid client IP address")


async def test_garbage_sender_domains_do_not_raise(checker: SpfChecker) -> None:
    for sender in ("x@" + "a" * 70 + ".example", "x@a..b", "x@", "x@exa mple.org", "x@\u00e9t\u00e9.example"):
        res = await checker.check("192.0.2.10", sender, "h")
        assert res.result in ("none", "permerror", "temperror"), (sender, res)


def test_sanitize_strips_control_characters_and_bounds_length() -> None:
    assert sanitize("a\r\nb\x00c\td\u00e9e") == "a b c d e"
    assert len(sanitize("x" * 1000)) == 200


# The pipeline check -----------------------------------------------------------


def make_session(ip: str = "192.0.2.10", helo: str | None = "client.example") -> Session:
    return Session("S1", ipaddress.ip_address(ip), 40000, "127.0.0.1", 25, helo=helo)


def make_check(resolver: Resolver, **config: object) -> tuple[SpfCheck, Metrics]:
    metrics = Metrics(process=False)
    return SpfCheck(SpfConfig(**config), resolver, metrics), metrics  # type: ignore[arg-type]


async def test_check_records_result_details_and_metric(resolver: Resolver) -> None:
    check, metrics = make_check(resolver)
    txn = Transaction("T1", "alice@pass.example")
    assert await check.mail(make_session(), txn) is None
    result = txn.results["spf"]
    assert isinstance(result, CheckResult)
    assert (result.check, result.result) == ("spf", "pass")
    assert result.details == {
        "domain": "pass.example",
        "identity": "mailfrom",
        "smtp.mailfrom": "alice@pass.example",
    }
    assert "designates 192.0.2.10" in result.comment
    assert isinstance(spf_result(txn), SpfResult)
    labels = {"method": "spf", "result": "pass"}
    assert metrics.registry.get_sample_value("smtpproxy_auth_results_total", labels) == 1


async def test_check_fail_is_only_recorded_by_default(resolver: Resolver) -> None:
    check, _ = make_check(resolver)
    txn = Transaction("T1", "x@fail.example")
    assert await check.mail(make_session("203.0.113.5"), txn) is None
    assert (r := spf_result(txn)) is not None and r.result == "fail"


async def test_check_rejects_fail_when_configured(resolver: Resolver) -> None:
    check, _ = make_check(resolver, reject_on_fail=True)
    verdict = await check.mail(make_session("203.0.113.5"), Transaction("T1", "x@fail.example"))
    assert isinstance(verdict, Verdict) and verdict.action is Action.REJECT
    assert verdict.reply is not None
    assert verdict.reply.render() == (
        "550 5.7.23 SPF validation failed for fail.example: "
        "203.0.113.5 is not one of fail.example's X-Injected: yes servers"
    )
    assert verdict.reasons == ("spf",)


async def test_check_does_not_reject_softfail_even_when_configured(resolver: Resolver) -> None:
    check, _ = make_check(resolver, reject_on_fail=True)
    assert await check.mail(make_session(), Transaction("T1", "x@soft.example")) is None


async def test_check_tempfails_temperror_when_configured(resolver: Resolver) -> None:
    quiet, _ = make_check(resolver)
    strict, _ = make_check(resolver, tempfail_on_temperror=True)
    assert await quiet.mail(make_session(), Transaction("T1", "x@broken.example")) is None
    verdict = await strict.mail(make_session(), Transaction("T2", "x@broken.example"))
    assert isinstance(verdict, Verdict) and verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None and verdict.reply.render().startswith("451 4.4.3 ")


async def test_check_null_sender_records_helo_identity(resolver: Resolver) -> None:
    check, _ = make_check(resolver)
    txn = Transaction("T1", "")
    await check.mail(make_session("192.0.2.9", "helo.example"), txn)
    result = txn.results["spf"]
    assert isinstance(result, CheckResult)
    assert result.result == "pass"
    assert result.details == {"domain": "helo.example", "identity": "helo", "smtp.helo": "helo.example"}


async def test_check_helo_identity_is_sanitised(resolver: Resolver) -> None:
    check, _ = make_check(resolver)
    txn = Transaction("T1", "")
    await check.mail(make_session("192.0.2.9", "evil\r\nX-Bad: 1"), txn)
    result = txn.results["spf"]
    assert isinstance(result, CheckResult)
    assert "\r" not in result.details["smtp.helo"] and "\n" not in result.details["smtp.helo"]


async def test_check_skips_helo_identity_when_disabled(resolver: Resolver, server: DnsServer) -> None:
    check, _ = make_check(resolver, helo_check=False)
    txn = Transaction("T1", "")
    await check.mail(make_session("192.0.2.9", "helo.example"), txn)
    assert (r := spf_result(txn)) is not None and r.result == "none"
    assert server.queries == []


def test_build_spf_check_honours_enabled(resolver: Resolver) -> None:
    metrics = Metrics(process=False)
    assert build_spf_check(SpfConfig(enabled=False), resolver, metrics) is None
    check = build_spf_check(SpfConfig(), resolver, metrics)
    assert isinstance(check, SpfCheck) and check.name == "spf"


def test_config_defaults_and_errors() -> None:
    config = build_config({})
    assert config.spf == SpfConfig(
        enabled=True, reject_on_fail=False, helo_check=True, tempfail_on_temperror=False, timeout=15.0
    )
    assert build_config({"spf": {"reject_on_fail": True}}).spf.reject_on_fail is True
    with pytest.raises(ConfigError) as err:
        build_config({"spf": {"timeout": 0, "reject": True, "enabled": "perhaps"}})
    text = "\n".join(err.value.problems)
    assert "spf.timeout" in text and "spf.reject: unknown key" in text and "spf.enabled" in text


async def test_warm_evaluation_completes_without_suspending(checker: SpfChecker) -> None:
    await checker.check("192.0.2.7", "x@mx.example", "h")
    # Everything is in the resolver's cache: the evaluation must run in one go,
    # never awaiting DNS (no rerun, no thread hop).
    coro = checker.check("192.0.2.7", "x@mx.example", "h")
    with pytest.raises(StopIteration) as done:
        coro.send(None)
    assert done.value.value.result == "pass"


async def test_library_error_becomes_temperror(checker: SpfChecker, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulates a pyspf bug on odd input (nothing real triggers one on demand).
    def broken(self: object, spf: object = None) -> None:
        raise AttributeError("pyspf internal error")

    monkeypatch.setattr("smtpproxy.auth.spf._Query.check", broken)
    res = await checker.check("192.0.2.10", "x@pass.example", "h")
    assert (res.result, res.explanation) == ("temperror", "SPF evaluation error")


# Reusing results while their DNS answers are cached unchanged (spfcache) ------------


class Clock:
    """A monotonic clock the test moves by hand (the resolver's TTLs run on it)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_repeated_sender_gets_the_stored_result(checker: SpfChecker) -> None:
    first = await checker.check("192.0.2.10", "alice@include.example", "client.test")
    again = await checker.check("192.0.2.10", "alice@include.example", "client.test")
    assert first.result == "pass"
    assert again is first  # the stored object: pyspf did not run again
    other_ip = await checker.check("203.0.113.5", "alice@include.example", "client.test")
    assert other_ip.result == "fail"
    assert len(checker.cache) == 2


async def test_stored_result_dropped_when_an_answer_it_read_expired_and_changed(server: DnsServer) -> None:
    clock = Clock()
    checker = SpfChecker(Resolver([server.address], timeout=2.0, clock=clock))
    first = await checker.check("192.0.2.10", "alice@include.example", "client.test")
    assert first.result == "pass"
    # The included record changes; while the old answer is cached the result stands ...
    server.set("pass.example", [("TXT", "v=spf1 -all")])
    assert await checker.check("192.0.2.10", "alice@include.example", "client.test") is first
    # ... once it expired, the new record is read and decides.
    clock.now += 301
    after = await checker.check("192.0.2.10", "alice@include.example", "client.test")
    assert after.result == "fail"


async def test_result_of_records_with_time_macro_is_not_stored(
    server: DnsServer, checker: SpfChecker
) -> None:
    # %{t} is only allowed in explanations (RFC 7208 §7.3): the text changes every second.
    server.set("time.example", [("TXT", "v=spf1 -all exp=exp.time.example")])
    server.set("exp.time.example", [("TXT", "rejected at %{t}")])
    first = await checker.check("192.0.2.10", "alice@time.example", "client.test")
    assert first.result == "fail"
    assert first.explanation.startswith("rejected at ")
    assert len(checker.cache) == 0
    assert await checker.check("192.0.2.10", "alice@time.example", "client.test") is not first


async def test_temperror_from_an_uncached_failure_is_not_reused(checker: SpfChecker) -> None:
    first = await checker.check("192.0.2.10", "erin@broken.example", "client.test")
    assert first.result == "temperror"
    assert await checker.check("192.0.2.10", "erin@broken.example", "client.test") is not first


def test_cache_is_bounded(resolver: Resolver) -> None:
    from smtpproxy.auth.spfcache import SpfResultCache
    from smtpproxy.dns import DnsAnswer

    cache = SpfResultCache(resolver, size=3)
    answers = {("x.example", "TXT"): DnsAnswer("x.example", "TXT", "ok", ("v=spf1 -all",))}
    for i in range(5):
        cache.put((f"192.0.2.{i}", "a@x.example", "h"), object(), answers)
    assert len(cache) == 3
    assert cache.get(("192.0.2.0", "a@x.example", "h")) is None  # oldest went first
