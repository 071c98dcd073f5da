"""The rate-limit check for the pipeline, built from the configuration.

``build_ratelimit_checks(config, metrics)`` returns the one ``ratelimit`` check;
its ``limiter`` is what the rules engine calls (``limiter.hit``), and
``close()`` frees the store when the application stops.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Coroutine
from typing import Any

from smtpproxy.config import Config, RateLimitConfig
from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.keys import KeySpec
from smtpproxy.ratelimit.limiter import Limit, RateLimiter
from smtpproxy.ratelimit.memory import MemoryStore
from smtpproxy.ratelimit.redis_store import RedisStore
from smtpproxy.ratelimit.store import Store
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.stages import Check, Stage
from smtpproxy.verdict import Verdict


class RateLimitCheck(Check):
    """Applies the configured rate and concurrency limits at every stage that has some."""

    name = "ratelimit"
    protective = True  # an accept rule never lifts a rate or concurrency limit

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self._stages = limiter.stages()
        # The memory store does no I/O: its stages need no deadline, and its
        # microseconds are timed with the stage rather than on their own.
        self.pure = isinstance(limiter.store, MemoryStore)
        self.timed = not self.pure

    def handles(self, stage: Stage) -> bool:
        """Only the stages that have limits (or hold concurrency slots): no cost elsewhere."""
        return stage in self._stages

    # The stage methods hand back the limiter's coroutine rather than awaiting
    # it in one of their own: a frame less at every stage of every message.

    def connect(self, session: Session) -> Coroutine[Any, Any, Verdict | None]:
        """Connection rates and concurrency: 421 4.7.0 and close when exceeded."""
        return self.limiter.check(Stage.CONNECT, session)

    def helo(self, session: Session) -> Coroutine[Any, Any, Verdict | None]:
        """Limits keyed on HELO: 421 4.7.0 and close when exceeded."""
        return self.limiter.check(Stage.HELO, session)

    def mail(self, session: Session, txn: Transaction) -> Coroutine[Any, Any, Verdict | None]:
        """Per-transaction limits: 450 4.7.1 when exceeded."""
        return self.limiter.check(Stage.MAIL, session, txn)

    def rcpt(
        self, session: Session, txn: Transaction, rcpt: Recipient
    ) -> Coroutine[Any, Any, Verdict | None]:
        """Per-recipient limits: 450 4.7.1 when exceeded."""
        return self.limiter.check(Stage.RCPT, session, txn, rcpt)

    def data(self, session: Session, txn: Transaction) -> Coroutine[Any, Any, Verdict | None]:
        """Per-message limits at end of DATA: 450 4.7.1 when exceeded."""
        return self.limiter.check(Stage.DATA, session, txn)

    def disconnect(self, session: Session) -> Coroutine[Any, Any, None]:
        """Give back the connection's concurrency slots."""
        return self.limiter.release(session)

    async def close(self) -> None:
        """Close the store (Redis connections)."""
        await self.limiter.close()


def limit_from_config(item: RateLimitConfig) -> Limit:
    """A validated ``ratelimits`` entry as a ``Limit``."""
    spec = KeySpec(tuple(item.key), item.client_net_prefix.ipv4, item.client_net_prefix.ipv6)
    exempt = tuple(ipaddress.ip_network(n, strict=False) for n in item.exempt)
    return Limit(
        name=item.name,
        spec=spec,
        stage=Stage(item.stage),
        rate=item.parsed_rate,
        burst=item.effective_burst,
        concurrency=item.concurrency,
        exempt=exempt,
    )


PER_IP = "max_connections_per_ip"


def per_ip_limit(config: Config) -> Limit | None:
    """``limits.max_connections_per_ip`` as a concurrency limit on the client address (None: off).

    The default per-address cap is one more concurrency limit of the limiter,
    not a second counting mechanism: the same store, slot release at
    disconnect, ``ratelimit_exempt`` and ``smtpproxy_ratelimit_hits``.
    """
    count = config.limits.max_connections_per_ip
    if not count:
        return None
    return Limit(
        name=PER_IP,
        spec=KeySpec(("client_ip",)),
        stage=Stage.CONNECT,
        concurrency=count,
        text="Too many connections from your address, try again later",
        reason=PER_IP,
    )


def build_store(config: Config) -> Store:
    """The store ``ratelimit_store`` names: memory (per process) or Redis (shared)."""
    if config.ratelimit_store == "memory":
        return MemoryStore(max_keys=config.ratelimit_memory_max_keys)
    return RedisStore(config.ratelimit_store, timeout=config.ratelimit_store_timeout)


def build_ratelimiter(config: Config, metrics: Metrics, store: Store | None = None) -> RateLimiter:
    """The limiter of ``config`` (also usable without configured limits, for rules' ``hit``)."""
    limits = [limit_from_config(item) for item in config.ratelimits]
    per_ip = per_ip_limit(config)
    if per_ip is not None:
        limits.append(per_ip)
    return RateLimiter(
        limits,
        store if store is not None else build_store(config),
        metrics,
        fail=config.ratelimit_fail,
        exempt=config.ratelimit_exempt,
        concurrency_ttl=config.ratelimit_concurrency_ttl,
    )


def build_ratelimit_checks(
    config: Config, metrics: Metrics, limiter: RateLimiter | None = None
) -> list[Check]:
    """The pipeline checks of the rate-limit area: one ``RateLimitCheck`` (call its ``close()``).

    ``limiter``: one already built by :func:`build_ratelimiter` (the App shares
    it with the rules engine's ``ratelimit`` action); built here when None.
    """
    return [RateLimitCheck(limiter if limiter is not None else build_ratelimiter(config, metrics))]
