"""The Redis store against a real redis-server: exact across processes, faults, recovery, slots."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.config import build_config
from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.check import RateLimitCheck, build_ratelimit_checks
from smtpproxy.ratelimit.redis_store import RedisStore
from smtpproxy.ratelimit.store import RateEntry, SlotAcquire, SlotRefresh, StoreError
from smtpproxy.session import Session, Transaction, new_id
from smtpproxy.verdict import Verdict
from tests.redisserver import RedisServer, redis_server

__all__ = ["redis_server"]  # the fixture, imported for pytest

ROOT = Path(__file__).resolve().parent.parent
MSGS = {"name": "msgs", "key": "sender_domain", "rate": "10/day", "burst": 10, "on": "mail"}


def session(ip: str = "192.0.2.10") -> Session:
    return Session(new_id(), ipaddress.ip_address(ip), 40000, "127.0.0.1", 25, helo="c.example")


def make_check(url: str, limits: list[dict[str, Any]], **extra: Any) -> tuple[RateLimitCheck, Metrics]:
    config = build_config({"ratelimits": limits, "ratelimit_store": url, **extra})
    metrics = Metrics(process=False)
    check = build_ratelimit_checks(config, metrics)[0]
    assert isinstance(check, RateLimitCheck)
    check.limiter.retry_interval = 0.05  # tests want to see recovery quickly
    return check, metrics


def store_errors(metrics: Metrics, kind: str, handled: str) -> float:
    labels = {"kind": kind, "handled": handled}
    return metrics.registry.get_sample_value("smtpproxy_ratelimit_store_errors_total", labels) or 0.0


async def eventually_allowed(check: RateLimitCheck, txn_from: str, attempts: int = 200) -> Verdict | None:
    """Ask until the store answers again (bounded: ``attempts`` x 50 ms)."""
    verdict: Verdict | None = None
    for _ in range(attempts):
        out = await check.mail(session(), Transaction("T", txn_from))
        verdict = out if isinstance(out, Verdict) else None
        if check.limiter._down_kind == "":
            return verdict
        await asyncio.sleep(0.05)
    raise AssertionError("the store did not come back")


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[RedisStore]:
    s = RedisStore(redis_server.url, timeout=0.5)
    yield s
    await s.close()


async def test_gcra_in_redis_with_burst_refusal_and_key_expiry(
    store: RedisStore, redis_server: RedisServer
) -> None:
    entry = RateEntry("l:k", 60.0, 3)
    assert [await store.apply([entry]) for _ in range(3)] == [[0.0]] * 3
    refused = (await store.apply([entry]))[0]
    assert 59.0 < refused <= 60.0
    pttl = int(redis_server.command("PTTL", "smtpproxy:rl:l:k").strip(b":\r\n"))
    assert 170_000 < pttl <= 180_001  # gone when it holds nothing (TAT 180 s ahead)


async def test_several_limits_in_one_call_are_all_or_nothing(store: RedisStore) -> None:
    a, b = RateEntry("a:x", 3600.0, 2), RateEntry("b:x", 3600.0, 1)
    assert await store.apply([a, b]) == [0.0, 0.0]
    results = await store.apply([a, b])
    assert results[0] == 0.0 and results[1] > 0
    assert await store.apply([a]) == [0.0]
    assert (await store.apply([a]))[0] > 0


async def test_concurrency_slots_in_a_sorted_set(store: RedisStore, redis_server: RedisServer) -> None:
    take = [SlotAcquire("c:ip", f"t{i}", 2, 30.0) for i in range(3)]
    assert await store.apply([take[0]]) == [0.0]
    assert await store.apply([take[1]]) == [0.0]
    assert (await store.apply([take[2]]))[0] > 0
    assert await store.apply([take[1]]) == [0.0]  # asking again keeps the slot
    await store.release([("c:ip", "t0")])
    assert await store.apply([take[2]]) == [0.0]
    assert redis_server.command("ZCARD", "smtpproxy:rl:c:ip") == b":2\r\n"
    assert await store.apply([SlotRefresh("c:ip", "t9", 30.0)]) == [0.0]  # not held: no-op
    assert redis_server.command("ZCARD", "smtpproxy:rl:c:ip") == b":2\r\n"


_WORKER = """
import asyncio, ipaddress, os, sys, time
from smtpproxy.config import build_config
from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.check import build_ratelimit_checks
from smtpproxy.session import Session, Transaction

async def main(url, attempts, go):
    limit = {"name": "msgs", "key": "sender_domain", "rate": "10/day", "burst": 10, "on": "mail"}
    config = build_config({"ratelimits": [limit], "ratelimit_store": url, "ratelimit_fail": "closed"})
    check = build_ratelimit_checks(config, Metrics(process=False))[0]
    deadline = time.monotonic() + 20
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.005)
    allowed = refused = 0
    for i in range(attempts):
        s = Session(f"S{i}", ipaddress.ip_address("192.0.2.1"), 1, "127.0.0.1", 25)
        verdict = await check.mail(s, Transaction("T", "someone@flood.example"))
        if verdict is None:
            allowed += 1
        else:
            assert verdict.reply.render() == "450 4.7.1 Rate limit msgs exceeded, try again later", verdict
            refused += 1
    await check.close()
    print(allowed, refused)

asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3]))
"""


def run_workers(url: str, attempts: int, go: Path, count: int = 2) -> list[tuple[int, int]]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, url, str(attempts), str(go)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )
        for _ in range(count)
    ]
    time.sleep(0.3)  # let both import and wait at the start line (not a correctness condition)
    go.touch()
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=60)
        assert p.returncode == 0, stderr.decode()
        allowed, refused = stdout.split()
        out.append((int(allowed), int(refused)))
    return out


def test_two_processes_sharing_redis_enforce_one_limit_exactly(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    results = run_workers(redis_server.url, 10, tmp_path / "go")
    assert sum(a for a, _ in results) == 10  # exactly the burst across both processes
    assert sum(r for _, r in results) == 10
    # The 11th and later are refused whichever process gets them.
    again = run_workers(redis_server.url, 1, tmp_path / "go2")
    assert again == [(0, 1), (0, 1)]


async def test_fail_open_allows_and_counts_then_recovers(redis_server: RedisServer) -> None:
    check, metrics = make_check(redis_server.url, [{**MSGS, "rate": "1/day", "burst": 1}])
    assert await check.mail(session(), Transaction("T", "a@x.example")) is None
    assert await check.mail(session(), Transaction("T", "a@x.example")) is not None
    redis_server.stop()
    for _ in range(3):
        assert await check.mail(session(), Transaction("T", "a@x.example")) is None
    assert store_errors(metrics, "connection", "open") == 3
    redis_server.start()
    # Back (empty, no persistence): the first is allowed, and the limit holds again.
    assert await eventually_allowed(check, "b@y.example") is None
    assert await check.mail(session(), Transaction("T", "b@y.example")) is not None
    await check.close()


async def test_fail_closed_refuses_with_4xx_then_recovers(redis_server: RedisServer) -> None:
    limits: list[dict[str, Any]] = [
        {**MSGS, "rate": "1/day", "burst": 1},
        {"name": "conn", "key": "client_ip", "rate": "9/day"},
    ]
    check, metrics = make_check(redis_server.url, limits, ratelimit_fail="closed")
    redis_server.stop()
    verdict = await check.mail(session(), Transaction("T", "a@x.example"))
    assert isinstance(verdict, Verdict) and verdict.reply is not None
    assert verdict.reply.render() == "451 4.3.0 Rate limit service unavailable, try again later"
    assert not verdict.disconnect
    verdict = await check.connect(session())
    assert isinstance(verdict, Verdict) and verdict.reply is not None
    assert verdict.reply.render() == "421 4.3.0 Rate limit service unavailable, try again later"
    assert verdict.disconnect
    assert store_errors(metrics, "connection", "closed") == 2
    redis_server.start()
    assert await eventually_allowed(check, "a@x.example") is None
    await check.close()


async def test_slow_redis_times_out_instead_of_hanging(redis_server: RedisServer) -> None:
    check, metrics = make_check(redis_server.url, [MSGS], ratelimit_store_timeout=0.2)
    assert await check.mail(session(), Transaction("T", "a@x.example")) is None
    assert redis_server.proc is not None
    redis_server.proc.send_signal(signal.SIGSTOP)  # alive but silent: a hung Redis
    try:
        started = time.monotonic()
        assert await check.mail(session(), Transaction("T", "a@x.example")) is None
        # Bounded by the store timeout (checked loosely: it must not hang for seconds).
        assert time.monotonic() - started < 5
        assert store_errors(metrics, "timeout", "open") == 1
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert await eventually_allowed(check, "a@x.example") is None
    await check.close()


async def test_concurrency_released_on_disconnect_through_redis(redis_server: RedisServer) -> None:
    check, _ = make_check(redis_server.url, [{"name": "concurrent", "key": "client_ip", "concurrency": 2}])
    one, two, three = session(), session(), session()
    assert await check.connect(one) is None
    assert await check.connect(two) is None
    assert await check.connect(three) is not None
    await check.disconnect(one)  # the client vanished without QUIT: disconnect still runs
    assert await check.connect(three) is None
    for s in (two, three):
        await check.disconnect(s)
    assert redis_server.command("EXISTS", "smtpproxy:rl:concurrent:192.0.2.10") == b":0\r\n"
    await check.close()


_CRASHER = """
import asyncio, os, sys
from smtpproxy.ratelimit.redis_store import RedisStore
from smtpproxy.ratelimit.store import SlotAcquire

async def main():
    store = RedisStore(sys.argv[1])
    print(await store.apply([SlotAcquire("concurrent:192.0.2.10", "crashed-conn", 1, 1.0)]), flush=True)
    os.kill(os.getpid(), 9)  # die holding the slot: no disconnect, no release

asyncio.run(main())
"""


async def test_slots_of_a_crashed_process_expire(redis_server: RedisServer) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASHER, redis_server.url, stdout=subprocess.PIPE, env=env
    )
    stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == -signal.SIGKILL and stdout.strip() == b"[0.0]"
    store = RedisStore(redis_server.url)
    mine = SlotAcquire("concurrent:192.0.2.10", "new-conn", 1, 30.0)
    assert (await store.apply([mine]))[0] > 0  # still held by the dead process
    for _ in range(100):  # bounded: 100 x 50 ms, the slot's ttl is 1 s
        if await store.apply([mine]) == [0.0]:
            break
        await asyncio.sleep(0.05)
    else:
        raise AssertionError("the crashed process's slot never expired")
    await store.close()


async def test_store_error_kinds_and_bad_urls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected a URL"):
        RedisStore("http://127.0.0.1:1")
    with pytest.raises(ValueError, match="service name"):
        RedisStore("redis+sentinel://127.0.0.1:26379")
    from tests.redisserver import free_port

    dead = RedisStore(f"redis://127.0.0.1:{free_port()}/0", timeout=0.5)
    with pytest.raises(StoreError) as err:
        await dead.apply([RateEntry("a:b", 1.0, 1)])
    assert err.value.kind == "connection"
    assert not await dead.ping()
    await dead.close()


async def test_concurrent_calls_batched_into_one_script_stay_exact(store: RedisStore) -> None:
    # 30 sessions asking in the same event-loop turn share one script call;
    # each is still its own all-or-nothing step, in order.
    entry = RateEntry("batch:k", 3600.0, 10)
    results = await asyncio.gather(
        *(store.apply([entry, RateEntry(f"other:{i}", 3600.0, 1)]) for i in range(30))
    )
    assert sum(1 for r in results if r == [0.0, 0.0]) == 10
    assert all(r[0] > 0 and r[1] == 0.0 for r in results if r != [0.0, 0.0])
    # The refused groups wrote nothing: their "other" keys are still fresh.
    assert (await store.apply([RateEntry("other:29", 3600.0, 1)])) == [0.0]


async def test_script_reloaded_after_redis_forgets_it(store: RedisStore, redis_server: RedisServer) -> None:
    # A restarted or flushed Redis answers NOSCRIPT: the call falls back to EVAL.
    entry = RateEntry("flush:k", 3600.0, 1)
    assert await store.apply([entry]) == [0.0]
    assert redis_server.command("SCRIPT", "FLUSH") == b"+OK\r\n"
    assert (await store.apply([entry]))[0] > 0
    assert (await store.apply([RateEntry("flush:other", 3600.0, 1)])) == [0.0]


async def test_requests_made_during_a_call_share_the_next_one(redis_server: RedisServer) -> None:
    # Group commit: one call in flight; everything asked meanwhile goes out together.
    store = RedisStore(redis_server.url, timeout=5.0)
    assert redis_server.proc is not None
    assert await store.apply([RateEntry("warm:k", 1.0, 1)]) == [0.0]
    calls = store.calls
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        first = asyncio.ensure_future(store.apply([RateEntry("gc:first", 3600.0, 1)]))
        await asyncio.sleep(0.05)  # the first call is now in flight, unanswered
        rest = []
        for _ in range(20):  # asked in different event-loop turns
            rest.append(asyncio.ensure_future(store.apply([RateEntry("gc:rest", 3600.0, 5)])))
            await asyncio.sleep(0.005)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    assert await first == [0.0]
    answers = await asyncio.gather(*rest)
    assert store.calls - calls == 2
    assert sum(1 for a in answers if a == [0.0]) == 5  # still exact inside the shared call
    await store.close()


async def test_no_stale_reply_after_a_timed_out_call(redis_server: RedisServer) -> None:
    # A call cut short by the timeout leaves its reply on the wire: the
    # connection is dropped, so a later call never reads that reply as its own.
    store = RedisStore(redis_server.url, timeout=0.2)
    assert redis_server.proc is not None
    assert await store.apply([RateEntry("stale:k", 3600.0, 1)]) == [0.0]
    redis_server.proc.send_signal(signal.SIGSTOP)
    try:
        with pytest.raises(StoreError) as err:
            await store.apply([RateEntry("stale:other", 3600.0, 1)])  # would answer [0]
        assert err.value.kind == "timeout"
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
    for _ in range(100):  # bounded: Redis needs a moment to answer again
        try:
            answer = await store.apply([RateEntry("stale:k", 3600.0, 1)])
            break
        except StoreError:
            await asyncio.sleep(0.05)
    else:
        raise AssertionError("the store did not come back")
    assert answer[0] > 0  # its own (refused) answer, not the stale allowed one
    await store.close()


async def test_connection_closed_by_redis_while_idle_is_replaced(tmp_path: Path) -> None:
    # Redis' `timeout` closes idle clients: the next call must not fail (and
    # with ratelimit_fail: closed refuse mail) just because the store's own
    # connection went stale while the site was quiet.
    server = RedisServer(tmp_path, extra={"timeout": "1"})
    server.start()
    store = RedisStore(server.url, timeout=1.0)
    try:
        assert await store.apply([RateEntry("idle:k", 3600.0, 2)]) == [0.0]
        await asyncio.sleep(2.5)  # Redis checks idle clients about once a second
        assert await store.apply([RateEntry("idle:k", 3600.0, 2)]) == [0.0]
        assert (await store.apply([RateEntry("idle:k", 3600.0, 2)]))[0] > 0
    finally:
        await store.close()
        server.stop()
