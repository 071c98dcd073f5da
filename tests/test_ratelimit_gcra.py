"""GCRA with an injected clock, rate parsing, and the bounded memory store."""

from __future__ import annotations

import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.ratelimit.gcra import Rate, gcra, parse_rate
from smtpproxy.ratelimit.memory import MemoryStore
from smtpproxy.ratelimit.store import RateEntry, SlotAcquire, SlotRefresh


class FakeClock:
    """Monotonic seconds that only move when the test says so."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(tat: float | None, times: list[float], interval: float, burst: int) -> list[bool]:
    out = []
    for now in times:
        d = gcra(tat, now, interval, burst)
        out.append(d.allowed)
        if d.allowed:
            tat = d.tat
    return out


def test_parse_rate_units_and_plural() -> None:
    assert parse_rate("60/minute") == Rate(60, "minute")
    assert parse_rate(" 500 / hours ") == Rate(500, "hour")
    assert parse_rate("1/day").interval == 86400.0
    assert parse_rate("10/second").interval == pytest.approx(0.1)


@pytest.mark.parametrize("bad", ["60", "60/min", "0/minute", "-1/hour", "x/hour", "60/fortnight", ""])
def test_parse_rate_rejects_bad_text(bad: str) -> None:
    with pytest.raises(ValueError, match="rate"):
        parse_rate(bad)


def test_default_burst_is_the_rate_count() -> None:
    assert Rate(100, "minute").default_burst() == 100


def test_burst_is_admitted_back_to_back_then_refused() -> None:
    assert run(None, [0.0] * 6, interval=1.0, burst=5) == [True] * 5 + [False]


def test_refusal_reports_when_to_retry() -> None:
    tat = None
    for _ in range(3):
        d = gcra(tat, 10.0, 2.0, 3)
        tat = d.tat
    refused = gcra(tat, 10.0, 2.0, 3)
    assert not refused.allowed
    assert refused.retry_after == pytest.approx(2.0)
    assert refused.tat == tat  # a refusal stores nothing new


def test_steady_rate_at_the_interval_is_always_allowed() -> None:
    times = [i * 0.5 for i in range(200)]
    assert all(run(None, times, interval=0.5, burst=1))


def test_faster_than_the_rate_is_refused_after_the_burst() -> None:
    times = [i * 0.4 for i in range(50)]  # 2.5/s against 2/s, burst 3
    allowed = run(None, times, interval=0.5, burst=3)
    assert not all(allowed)
    # Over 19.6 s at most 3 + 19.6 / 0.5 requests fit.
    assert sum(allowed) <= 3 + int(19.6 / 0.5) + 1


def test_recovery_after_idle_gives_the_full_burst_back() -> None:
    d = None
    tat: float | None = None
    for _ in range(4):
        d = gcra(tat, 0.0, 1.0, 4)
        tat = d.tat
    assert not gcra(tat, 0.0, 1.0, 4).allowed
    assert gcra(tat, 1.0, 1.0, 4).allowed  # one interval later: one more
    assert run(tat, [4.0] * 5, 1.0, 4) == [True] * 4 + [False]  # fully idle: the whole burst


def test_no_fixed_window_edge() -> None:
    # A fixed 60 s window of 10 lets 10 in at 59.9 s and 10 more at 60.0 s.
    # GCRA with 10/minute, burst 10: after 10 at 59.9 s, the next at 60.0 s is refused
    # and only one per 6 s comes back.
    tat = None
    for _ in range(10):
        d = gcra(tat, 59.9, 6.0, 10)
        assert d.allowed
        tat = d.tat
    assert run(tat, [60.0, 61.0, 65.8, 66.0], 6.0, 10) == [False, False, False, True]


@settings(max_examples=200, deadline=None)
@given(
    gaps=st.lists(st.floats(min_value=0, max_value=5), min_size=1, max_size=100),
    interval=st.floats(min_value=0.01, max_value=10),
    burst=st.integers(min_value=1, max_value=20),
)
def test_never_more_than_burst_plus_elapsed_over_interval(
    gaps: list[float], interval: float, burst: int
) -> None:
    times, t = [], 0.0
    for g in gaps:
        t += g
        times.append(t)
    allowed = run(None, times, interval, burst)
    assert sum(allowed) <= burst + (times[-1] - times[0]) / interval + 1e-9


async def test_memory_store_applies_several_entries_all_or_nothing() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=1024, clock=clock)
    a = RateEntry("a:x", 10.0, 2)
    b = RateEntry("b:x", 10.0, 1)
    assert await store.apply([a, b]) == [0.0, 0.0]
    # b is exhausted: neither is updated, so a still has one left.
    results = await store.apply([a, b])
    assert results[0] == 0.0 and results[1] > 0
    assert await store.apply([a]) == [0.0]
    assert (await store.apply([a]))[0] > 0


async def test_memory_store_concurrency_slots_take_refresh_release_and_expire() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=1024, clock=clock)
    take = [SlotAcquire("c:ip", f"t{i}", 2, 60.0) for i in range(3)]
    assert await store.apply([take[0]]) == [0.0]
    assert await store.apply([take[1]]) == [0.0]
    assert (await store.apply([take[2]]))[0] > 0
    assert await store.apply([take[0]]) == [0.0]  # a holder asking again keeps its slot
    await store.release([("c:ip", "t0")])
    assert await store.apply([take[2]]) == [0.0]
    clock.now += 40
    await store.apply([SlotRefresh("c:ip", "t1", 60.0)])
    clock.now += 30  # t2 expired (70 s), t1 refreshed at 40 s is alive until 100 s
    assert store.slots_held("c:ip") == 1
    clock.now += 31
    assert store.slots_held("c:ip") == 0


async def test_memory_store_is_bounded_and_replaces_expired_keys_first() -> None:
    clock = FakeClock()
    store = MemoryStore(max_keys=4096, clock=clock)
    # 100 keys that stay busy for a long time (1/hour).
    hot = [RateEntry(f"hot:{i}", 3600.0, 1) for i in range(100)]
    for e in hot:
        await store.apply([e])
    # A flood of 50,000 distinct short-lived keys (expire after 1 s).
    for i in range(50_000):
        await store.apply([RateEntry(f"flood:{i}", 1.0, 1)])
        if i % 1000 == 999:
            clock.now += 2  # earlier flood keys have expired
    assert store.capacity == 4096
    assert store.used() <= store.capacity
    # The hot keys survived the flood: expired flood keys were replaced instead.
    survived = sum(1 for e in hot if store.tat(e.key) is not None)
    assert survived == 100
    for e in hot:
        assert (await store.apply([e]))[0] > 0


def test_memory_store_memory_does_not_grow_with_distinct_keys() -> None:
    tracemalloc.start()
    try:
        store = MemoryStore(max_keys=16_384, clock=FakeClock())
        before = tracemalloc.get_traced_memory()[0]
        for i in range(40_000):
            store.apply_at([RateEntry(f"k:{i}", 60.0, 10)], 1000.0)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert store.capacity == 16_384
    assert grown < 40_000 * 8  # far below any per-key allocation (a dict entry is ~100 bytes)
    assert 0.8 * store.capacity < store.used(1000.0) <= store.capacity


def test_memory_store_rejects_tiny_capacity() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        MemoryStore(max_keys=3)
