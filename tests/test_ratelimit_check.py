"""The ``ratelimit`` check on the memory store: replies per stage, exemptions, concurrency, rules."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from smtpproxy.config import build_config
from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.check import RateLimitCheck, build_ratelimit_checks, build_ratelimiter
from smtpproxy.ratelimit.gcra import Rate
from smtpproxy.ratelimit.memory import MemoryStore
from smtpproxy.session import Recipient, Session, Transaction, new_id
from smtpproxy.stages import Stage
from smtpproxy.verdict import Verdict


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def session(ip: str = "192.0.2.10", helo: str = "client.example") -> Session:
    return Session(new_id(), ipaddress.ip_address(ip), 40000, "127.0.0.1", 25, helo=helo)


def make(
    limits: list[dict[str, Any]], **extra: Any
) -> tuple[RateLimitCheck, Metrics, FakeClock, MemoryStore]:
    # The default per-address connection cap is a limit too: off unless a test asks for it.
    extra.setdefault("limits", {"max_connections_per_ip": None})
    config = build_config({"ratelimits": limits, **extra})
    metrics = Metrics(process=False)
    clock = FakeClock()
    store = MemoryStore(max_keys=4096, clock=clock)
    limiter = build_ratelimiter(config, metrics, store)
    limiter.clock = clock
    return RateLimitCheck(limiter), metrics, clock, store


def hits(metrics: Metrics, limit: str) -> float:
    return metrics.registry.get_sample_value("smtpproxy_ratelimit_hits_total", {"limit": limit}) or 0.0


def assert_refused(verdict: object, code: int, enhanced: str, name: str, disconnect: bool) -> None:
    assert isinstance(verdict, Verdict)
    assert verdict.reply is not None
    assert (verdict.reply.code, verdict.reply.enhanced) == (code, enhanced)
    assert verdict.reply.text == f"Rate limit {name} exceeded, try again later"
    assert verdict.disconnect is disconnect


async def test_connect_rate_answers_421_and_closes_naming_the_limit_not_the_key() -> None:
    check, metrics, _, _ = make([{"name": "conn_per_ip", "key": "client_ip", "rate": "3/hour"}])
    for _ in range(3):
        assert await check.connect(session()) is None
    verdict = await check.connect(session())
    assert_refused(verdict, 421, "4.7.0", "conn_per_ip", True)
    assert isinstance(verdict, Verdict) and verdict.reply is not None
    assert "192.0.2.10" not in verdict.reply.render()
    assert hits(metrics, "conn_per_ip") == 1
    assert await check.connect(session("192.0.2.11")) is None  # another client, its own bucket


async def test_helo_limit_answers_421() -> None:
    check, _, _, _ = make([{"name": "per_helo", "key": "helo", "rate": "1/hour"}])
    assert await check.helo(session()) is None
    assert_refused(await check.helo(session("192.0.2.99")), 421, "4.7.0", "per_helo", True)


async def test_mail_limit_by_client_net_answers_450() -> None:
    check, _, _, _ = make(
        [{"name": "msgs_per_ip", "key": "client_net", "rate": "500/hour", "burst": 2, "on": "mail"}]
    )
    for ip in ("192.0.2.1", "192.0.2.200"):
        assert await check.mail(session(ip), Transaction("T", "a@x.example")) is None
    verdict = await check.mail(session("192.0.2.3"), Transaction("T", "a@x.example"))
    assert_refused(verdict, 450, "4.7.1", "msgs_per_ip", False)
    assert await check.mail(session("192.0.3.3"), Transaction("T", "a@x.example")) is None


async def test_rcpt_limits_by_sender_domain_and_recipient_answer_450() -> None:
    check, metrics, _, _ = make(
        [
            {"name": "rcpts_per_from", "key": "sender_domain", "rate": "2000/hour", "burst": 3, "on": "rcpt"},
            {"name": "per_rcpt", "key": "recipient", "rate": "1/hour"},
        ]
    )
    s, txn = session(), Transaction("T", "a@from.example")
    assert await check.rcpt(s, txn, Recipient("one@to.example")) is None
    assert_refused(await check.rcpt(s, txn, Recipient("ONE@to.example")), 450, "4.7.1", "per_rcpt", False)
    # The refused RCPT used nothing of the sender domain's budget (all or nothing).
    assert await check.rcpt(s, txn, Recipient("two@to.example")) is None
    assert await check.rcpt(s, txn, Recipient("three@to.example")) is None
    verdict = await check.rcpt(s, txn, Recipient("four@to.example"))
    assert_refused(verdict, 450, "4.7.1", "rcpts_per_from", False)
    assert hits(metrics, "per_rcpt") == 1 and hits(metrics, "rcpts_per_from") == 1


async def test_recipient_domain_and_sender_keys_and_data_stage() -> None:
    check, _, _, _ = make(
        [
            {"name": "per_rdomain", "key": "recipient_domain", "rate": "1/day"},
            {"name": "msgs_per_sender", "key": ["client_ip", "sender"], "rate": "1/day", "on": "data"},
        ]
    )
    s = session()
    txn = Transaction("T", "a@from.example")
    assert await check.rcpt(s, txn, Recipient("x@to.example")) is None
    assert (await check.rcpt(s, txn, Recipient("y@TO.example"))) is not None
    assert await check.data(s, txn) is None
    assert_refused(
        await check.data(s, Transaction("T2", "A@from.example")), 450, "4.7.1", "msgs_per_sender", False
    )
    assert await check.data(session("192.0.2.50"), Transaction("T3", "a@from.example")) is None


async def test_rate_recovers_with_time() -> None:
    check, _, clock, _ = make([{"name": "r", "key": "client_ip", "rate": "60/minute", "burst": 1}])
    assert await check.connect(session()) is None
    assert await check.connect(session()) is not None
    clock.now += 1.0
    assert await check.connect(session()) is None


async def test_global_and_per_limit_exemptions() -> None:
    check, _, _, _ = make(
        [
            {"name": "a", "key": "client_ip", "rate": "1/hour", "exempt": ["198.51.100.0/24"]},
            {"name": "b", "key": "client_ip", "rate": "1/hour", "on": "helo"},
        ],
        ratelimit_exempt=["10.0.0.0/8", "2001:db8::/32"],
    )
    for _ in range(5):
        assert await check.connect(session("10.1.2.3")) is None
        assert await check.helo(session("10.1.2.3")) is None
        assert await check.connect(session("2001:db8::1")) is None
        assert await check.connect(session("198.51.100.7")) is None  # exempt from a only
    assert await check.helo(session("198.51.100.7")) is None
    assert_refused(await check.helo(session("198.51.100.7")), 421, "4.7.0", "b", True)


async def test_concurrency_is_held_until_disconnect() -> None:
    check, metrics, _, store = make([{"name": "concurrent", "key": "client_ip", "concurrency": 2}])
    first, second, third = session(), session(), session()
    assert await check.connect(first) is None
    assert await check.connect(second) is None
    verdict = await check.connect(third)
    assert isinstance(verdict, Verdict) and verdict.reply is not None
    assert verdict.reply.render() == "421 4.7.0 Too many connections (concurrent), try again later"
    assert verdict.disconnect
    await check.disconnect(third)  # refused connections hold nothing: no slot freed
    assert store.slots_held("concurrent:192.0.2.10") == 2
    await check.disconnect(first)  # a client that vanished without QUIT ends here too
    assert await check.connect(third) is None
    assert hits(metrics, "concurrent") == 1
    await check.disconnect(second)
    await check.disconnect(third)
    assert store.slots_held("concurrent:192.0.2.10") == 0


async def test_concurrency_refused_by_a_rate_at_connect_takes_no_slot() -> None:
    check, _, _, store = make(
        [
            {"name": "c", "key": "client_ip", "concurrency": 5},
            {"name": "r", "key": "client_ip", "rate": "1/hour"},
        ]
    )
    assert await check.connect(session()) is None
    assert await check.connect(session()) is not None
    assert store.slots_held("c:192.0.2.10") == 1


async def test_long_connections_refresh_their_slot() -> None:
    check, _, clock, store = make(
        [{"name": "c", "key": "client_ip", "concurrency": 1}], ratelimit_concurrency_ttl=60
    )
    s = session()
    assert await check.connect(s) is None
    for _ in range(5):  # 5 transactions 30 s apart: far past the 60 s ttl in total
        clock.now += 30
        assert await check.mail(s, Transaction("T", "a@b.example")) is None
    assert store.slots_held("c:192.0.2.10") == 1
    assert await check.connect(session()) is not None


async def test_a_refused_stage_does_not_count_as_a_slot_refresh() -> None:
    check, _, clock, store = make(
        [
            {"name": "c", "key": "client_ip", "concurrency": 1},
            {"name": "per_sender", "key": "sender", "rate": "1/hour"},
        ],
        ratelimit_concurrency_ttl=60,
    )
    s = session()
    assert await check.connect(s) is None
    clock.now += 25
    assert await check.mail(s, Transaction("T", "a@b.example")) is None  # refreshes: until +85
    clock.now += 25
    assert await check.mail(s, Transaction("T", "a@b.example")) is not None  # refused: no refresh
    clock.now += 5
    assert await check.mail(s, Transaction("T", "other@b.example")) is None  # refreshes: until +115
    clock.now += 45
    assert store.slots_held("c:192.0.2.10") == 1


def test_handles_only_stages_with_limits() -> None:
    check, _, _, _ = make([{"name": "r", "key": "recipient", "rate": "1/hour"}])
    assert [s for s in Stage if check.handles(s)] == [Stage.RCPT]
    conc, _, _, _ = make([{"name": "c", "key": "client_net", "concurrency": 1}])
    assert {s for s in Stage if conc.handles(s)} == {Stage.CONNECT, Stage.MAIL, Stage.DISCONNECT}


async def test_rules_hit_uses_its_own_key_space() -> None:
    check, metrics, clock, _ = make([{"name": "r", "key": "client_ip", "rate": "1/hour"}])
    limiter = check.limiter
    rate = Rate(1, "minute")
    assert await limiter.hit("big_attachments", "a@b.example", rate, 2)
    assert await limiter.hit("big_attachments", "a@b.example", rate, 2)
    assert not await limiter.hit("big_attachments", "a@b.example", rate, 2)
    assert await limiter.hit("big_attachments", "c@d.example", rate, 2)
    assert hits(metrics, "big_attachments") == 1
    clock.now += 60
    assert await limiter.hit("big_attachments", "a@b.example", rate, 2)


async def test_factory_builds_one_check_on_the_memory_store() -> None:
    config = build_config({"ratelimits": [{"name": "r", "key": "client_ip", "rate": "1/hour"}]})
    checks = build_ratelimit_checks(config, Metrics(process=False))
    assert len(checks) == 1 and checks[0].name == "ratelimit"
    check = checks[0]
    assert isinstance(check, RateLimitCheck)
    assert isinstance(check.limiter.store, MemoryStore)
    assert check.limiter.store.capacity == 1_000_000
    assert await check.connect(session()) is None
    assert await check.connect(session()) is not None
    await check.close()


@pytest.mark.parametrize("bad_fail", ["sometimes"])
def test_limiter_rejects_unknown_fail_policy(bad_fail: str) -> None:
    from smtpproxy.ratelimit.limiter import RateLimiter

    with pytest.raises(ValueError, match="open or closed"):
        RateLimiter([], MemoryStore(1024), Metrics(process=False), fail=bad_fail)


def test_ratelimit_keys_and_stage_speak_the_rule_language_too() -> None:
    """One vocabulary: rule field names and ``stage:`` work in ``ratelimits``; the old words still do."""
    from smtpproxy.config import build_config

    new = {"name": "a", "key": ["client.ip", "mail_from.domain"], "stage": "rcpt", "rate": "10/hour"}
    old = {"name": "b", "key": "client_ip+sender_domain", "on": "rcpt", "rate": "10/hour"}
    first, second = build_config({"ratelimits": [new, old]}).ratelimits
    assert (first.key, first.on) == (second.key, second.on) == (["client_ip", "sender_domain"], "rcpt")
    fields = {
        "name": "c",
        "key": ["client.net", "mail_from", "rcpt", "rcpt.domain"],
        "on": "rcpt",
        "rate": "1/second",
    }
    assert build_config({"ratelimits": [fields]}).ratelimits[0].key == [
        "client_net",
        "sender",
        "recipient",
        "recipient_domain",
    ]


def test_an_unquoted_yaml_on_key_names_the_stage(tmp_path: Any) -> None:
    from smtpproxy.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("rules: null\nratelimits:\n  - {name: a, key: client_ip, rate: 5/minute, on: helo}\n")
    assert load_config(path).ratelimits[0].on == "helo"
