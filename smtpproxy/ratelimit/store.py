"""What a rate-limit store does: apply several limits at once, all or nothing.

A stage (connect, mail, rcpt...) may have several limits. The limiter hands
the store every entry of the stage in one call (one Redis round trip). The
store checks them all and updates them only when every one allows: a refused
recipient does not use up the sender domain's budget, and a connection refused
by its rate does not hold a concurrency slot.

Entries:

* ``RateEntry``: one GCRA step (see :mod:`smtpproxy.ratelimit.gcra`);
* ``SlotAcquire``: take one of ``limit`` concurrency slots of ``key`` for the
  connection ``token``; a slot expires ``ttl`` seconds after it was last taken
  or refreshed, so the slots of a crashed process free themselves;
* ``SlotRefresh``: push a held slot's expiry ``ttl`` seconds ahead (long
  connections); never refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# URL schemes of ``ratelimit_store`` served by the Redis store.
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+sentinel://", "redis+cluster://")


class StoreError(Exception):
    """The store could not answer: ``kind`` is timeout, connection or error (a metrics label)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)


@dataclass(slots=True)
class RateEntry:
    """A GCRA step on ``key``: emission ``interval`` seconds, ``burst``, ``cost`` units."""

    key: str
    interval: float
    burst: int
    cost: int = 1


@dataclass(slots=True)
class SlotAcquire:
    """Take a concurrency slot of ``key`` (at most ``limit`` held) for connection ``token``."""

    key: str
    token: str
    limit: int
    ttl: float


@dataclass(slots=True)
class SlotRefresh:
    """Extend the expiry of the slot ``token`` holds on ``key``."""

    key: str
    token: str
    ttl: float


# Not frozen: entries are built for one store call and never changed, and a
# frozen dataclass's __init__ costs three times as much (several per message).
Entry = RateEntry | SlotAcquire | SlotRefresh


class Store(Protocol):
    """A place to keep limit state: in this process (memory) or shared (Redis)."""

    async def apply(self, entries: Sequence[Entry]) -> list[float]:
        """Check every entry; update them all only if all allow.

        Returns one number per entry: 0.0 when it allows, else the seconds
        until it would (a positive number). Raises ``StoreError``.
        """
        ...

    async def release(self, slots: Sequence[tuple[str, str]]) -> None:
        """Give back concurrency slots as ``(key, token)`` pairs. Raises ``StoreError``."""
        ...

    async def close(self) -> None:
        """Free connections; the store is unusable afterwards."""
        ...
