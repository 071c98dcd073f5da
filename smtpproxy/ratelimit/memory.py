"""The in-memory store: per process, fixed memory whatever the number of keys.

Per process: with ``workers: N`` each worker counts on its own, so a limit is
enforced per worker (a client may get up to N times the rate across them).
Use the Redis store for limits that are exact across workers and machines.

Memory bound: the GCRA state lives in a fixed-size, set-associative table of
``max_keys`` slots (8 per set), two flat arrays of 64-bit numbers: the key's
hash and its TAT. That is 16 bytes per slot allocated once, 16 MB for the
default 1,000,000 slots (measured with tracemalloc by
``bench/ratelimit_bench.py --memory``: 16,000,512 bytes empty, 16,000,648 after
1,000,000 distinct keys), and a flood of distinct keys cannot grow it. With as
many live keys as slots, about 86% are held (measured: 860,563 of 1,000,000). When a key's set
is full, the entry with the earliest TAT is replaced: an expired one (TAT in the
past, it holds nothing) when there is one, else the one nearest to expiry,
which loses the least allowance. Keys are compared by their 64-bit string hash;
Python salts it per process (SipHash), so clients cannot craft collisions.

Concurrency slots live in a dict of live connections (bounded by the number of
connections held within ``ttl``), expired lazily on access and by a sweep.
"""

from __future__ import annotations

import time
from array import array
from collections.abc import Callable, Sequence

from smtpproxy.ratelimit.gcra import gcra
from smtpproxy.ratelimit.store import Entry, RateEntry, SlotAcquire, SlotRefresh

WAYS = 8
# Sweep expired concurrency slots every this many acquisitions (amortised cost).
_SWEEP_EVERY = 1024


class MemoryStore:
    """Rate-limit state in this process; ``clock`` is injectable (monotonic seconds)."""

    def __init__(self, max_keys: int = 1_000_000, clock: Callable[[], float] = time.monotonic) -> None:
        if max_keys < WAYS:
            raise ValueError(f"max_keys must be >= {WAYS}, got {max_keys}")
        self._sets = max_keys // WAYS
        size = self._sets * WAYS
        # Repetition allocates exactly ``size`` items (no growth slack, no temporary).
        self._hashes = array("q", [0]) * size
        self._tats = array("d", [0.0]) * size
        self._slots: dict[str, dict[str, float]] = {}
        self._acquired = 0
        self.clock = clock

    @property
    def capacity(self) -> int:
        """How many GCRA keys the table holds at most."""
        return len(self._hashes)

    def _find(self, key: str) -> tuple[int, int, bool]:
        """(the key's hash, index of the key or of the slot to replace, found)."""
        h = hash(key) or 1  # 0 marks an empty slot
        base = (h % self._sets) * WAYS
        try:
            return h, self._hashes.index(h, base, base + WAYS), True
        except ValueError:
            tats = self._tats[base : base + WAYS]
            return h, base + tats.index(min(tats)), False

    def tat(self, key: str) -> float | None:
        """The stored TAT of ``key``, None when absent (for tests and the bench)."""
        _, i, found = self._find(key)
        return self._tats[i] if found else None

    def used(self, now: float | None = None) -> int:
        """Slots holding a key whose TAT is not yet in the past (O(capacity): tests and bench)."""
        t = self.clock() if now is None else now
        return sum(1 for h, tat in zip(self._hashes, self._tats, strict=True) if h and tat > t)

    def apply_at(self, entries: Sequence[Entry], now: float) -> list[float]:
        """The store's operation at time ``now`` (synchronous; see ``Store.apply``)."""
        results: list[float] = []
        writes: list[tuple[str, int, int, float]] = []  # key, hash, index, new TAT
        refused = False
        for entry in entries:
            if isinstance(entry, RateEntry):
                h, i, found = self._find(entry.key)
                d = gcra(self._tats[i] if found else None, now, entry.interval, entry.burst, entry.cost)
                if d.allowed:
                    writes.append((entry.key, h, i, d.tat))
                else:
                    refused = True
                results.append(d.retry_after)
            elif isinstance(entry, SlotAcquire):
                held = self._slots.get(entry.key, {})
                # Expired slots only matter when the key looks full: dropping them
                # then (and in the periodic sweep) keeps an acquisition O(1).
                if len(held) >= entry.limit:
                    held = self._live(entry.key, now)
                if entry.token in held or len(held) < entry.limit:
                    results.append(0.0)
                else:
                    refused = True
                    results.append(entry.ttl)
            else:
                results.append(0.0)
        if refused:
            return results
        written = False
        for key, h, i, tat in writes:
            if written:
                # An earlier write of this call may have taken the slot: look again.
                h, i, _ = self._find(key)
            self._hashes[i] = h
            self._tats[i] = tat
            written = True
        for entry in entries:
            if isinstance(entry, SlotAcquire):
                self._slots.setdefault(entry.key, {})[entry.token] = now + entry.ttl
                self._acquired += 1
                if self._acquired % _SWEEP_EVERY == 0:
                    self._sweep(now)
            elif isinstance(entry, SlotRefresh):
                tokens = self._slots.get(entry.key)
                if tokens is not None and entry.token in tokens:
                    tokens[entry.token] = now + entry.ttl
        return results

    def _live(self, key: str, now: float) -> dict[str, float]:
        held = self._slots.get(key)
        if held is None:
            return {}
        for token in [t for t, exp in held.items() if exp <= now]:
            del held[token]
        if not held:
            del self._slots[key]
        return held

    def _sweep(self, now: float) -> None:
        for key in list(self._slots):
            self._live(key, now)

    def slots_held(self, key: str) -> int:
        """Live concurrency slots of ``key``."""
        return len(self._live(key, self.clock()))

    async def apply(self, entries: Sequence[Entry]) -> list[float]:
        """See ``Store.apply``; never raises StoreError."""
        return self.apply_at(entries, self.clock())

    async def release(self, slots: Sequence[tuple[str, str]]) -> None:
        """See ``Store.release``."""
        for key, token in slots:
            held = self._slots.get(key)
            if held is not None:
                held.pop(token, None)
                if not held:
                    del self._slots[key]

    async def close(self) -> None:
        """Nothing to free."""
        return None
