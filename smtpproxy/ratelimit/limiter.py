"""The rate limiter: the configured limits of each stage, applied in one store call.

Replies (the text names the limit, never the key):

* connect, helo: ``421 4.7.0 Rate limit NAME exceeded, try again later`` and
  close (a concurrency limit: ``Too many connections (NAME), try again later``);
* mail, rcpt, data: ``450 4.7.1 Rate limit NAME exceeded, try again later``.

Store failures (Redis down or slower than ``ratelimit_store_timeout``) follow
``ratelimit_fail``: ``open`` allows, logs and counts
``smtpproxy_ratelimit_store_errors{kind,handled="open"}``; ``closed`` answers
``421 4.3.0`` at connect/helo and ``451 4.3.0`` later, counted with
``handled="closed"``. After a failure the store is not asked again for
``retry_interval`` seconds (the policy applies at once, so a dead Redis costs no
timeout per session), then the next call tries again: recovery is automatic.
"""

from __future__ import annotations

import ipaddress
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.gcra import Rate
from smtpproxy.ratelimit.keys import KeyFunction, KeySpec, client_ip, compile_key, scoped_key
from smtpproxy.ratelimit.memory import MemoryStore
from smtpproxy.ratelimit.store import Entry, RateEntry, SlotAcquire, SlotRefresh, Store, StoreError
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.stages import Stage
from smtpproxy.verdict import Action, Reply, Verdict

log = logging.getLogger("smtpproxy.ratelimit")

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

_EARLY = (Stage.CONNECT, Stage.HELO)


@dataclass(slots=True)
class LimiterState:
    """The limiter's state on a connection (``session.state``)."""

    slots: list[tuple[str, str]] = field(default_factory=list)  # (key, token) held by the connection
    refreshed: float = 0.0  # when the slots were last refreshed (the limiter's clock)
    exempt: bool | None = None  # the client is in ``ratelimit_exempt`` (None: not asked yet)
    token: str | None = None  # this connection's member in concurrency slots


@dataclass(frozen=True, slots=True)
class Limit:
    """One configured limit, ready to apply: a rate (``rate`` set) or a concurrency cap."""

    name: str
    spec: KeySpec
    stage: Stage
    rate: Rate | None = None
    burst: int = 1
    concurrency: int | None = None
    exempt: tuple[Network, ...] = ()
    text: str | None = None  # the reply text, when not the generic one below
    reason: str = "ratelimit"  # the verdict's first reason: the stage's decided_by


def refused_verdict(stage: Stage, limit: Limit) -> Verdict:
    """The reply for a request refused by ``limit`` at ``stage``."""
    if limit.text is not None:
        text = limit.text
    elif limit.concurrency is not None:
        text = f"Too many connections ({limit.name}), try again later"
    else:
        text = f"Rate limit {limit.name} exceeded, try again later"
    reply = Reply(421, "4.7.0", text) if stage in _EARLY else Reply(450, "4.7.1", text)
    return Verdict(Action.TEMPFAIL, reply, reasons=(limit.reason, limit.name), disconnect=stage in _EARLY)


def unavailable_verdict(stage: Stage) -> Verdict:
    """The fail-closed reply when the store cannot answer."""
    text = "Rate limit service unavailable, try again later"
    code = 421 if stage in _EARLY else 451
    return Verdict(
        Action.TEMPFAIL, Reply(code, "4.3.0", text), reasons=("ratelimit",), disconnect=stage in _EARLY
    )


class RateLimiter:
    """Applies limits through a store; also serves rules (``hit``) with their own keys."""

    def __init__(
        self,
        limits: Sequence[Limit],
        store: Store,
        metrics: Metrics,
        *,
        fail: str = "open",
        exempt: Sequence[str] = (),
        concurrency_ttl: float = 900.0,
        retry_interval: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if fail not in ("open", "closed"):
            raise ValueError(f"fail must be open or closed, got {fail!r}")
        self.limits = tuple(limits)
        self.store = store
        self.metrics = metrics
        self.fail_open = fail == "open"
        self.exempt = tuple(ipaddress.ip_network(n, strict=False) for n in exempt)
        self.concurrency_ttl = concurrency_ttl
        self.retry_interval = retry_interval
        self.clock = clock
        self._by_stage = {s: tuple(lim for lim in self.limits if lim.stage is s) for s in Stage}
        # Per stage: each limit with its key function and emission interval, made once.
        self._plans: dict[Stage, tuple[tuple[Limit, KeyFunction, float], ...]] = {
            stage: tuple(
                (lim, compile_key(lim.name, lim.spec), lim.rate.interval if lim.rate else 0.0)
                for lim in limits
            )
            for stage, limits in self._by_stage.items()
        }
        # With the (random) session id, makes slot tokens unique across processes.
        self._instance = secrets.token_hex(6)
        # The memory store answers synchronously: called directly, without the failure path.
        self._local = store.apply_at if isinstance(store, MemoryStore) else None
        self._down_until = 0.0
        self._down_kind = ""

    def stages(self) -> frozenset[Stage]:
        """The stages where this limiter has work (limits, slot refresh, release)."""
        stages = {lim.stage for lim in self.limits}
        if any(lim.concurrency is not None for lim in self.limits):
            stages |= {Stage.MAIL, Stage.DISCONNECT}
        return frozenset(stages)

    def _exempt(self, networks: tuple[Network, ...], session: Session) -> bool:
        ip = client_ip(session)
        return any(ip in net for net in networks)

    async def _apply(self, entries: Sequence[Entry]) -> list[float] | None:
        """The store's answer, or None when it failed (already logged and counted)."""
        now = self.clock()
        if now < self._down_until:
            self._count(self._down_kind)
            return None
        try:
            results = await self.store.apply(entries)
        except StoreError as err:
            if not self._down_kind:
                log.warning("rate-limit store failed (%s), failing %s: %s", err.kind, self._policy, err)
            self._down_until = now + self.retry_interval
            self._down_kind = err.kind
            self._count(err.kind)
            return None
        if self._down_kind:
            log.info("rate-limit store answers again")
            self._down_kind = ""
        return results

    @property
    def _policy(self) -> str:
        return "open" if self.fail_open else "closed"

    def _count(self, kind: str) -> None:
        self.metrics.ratelimit_store_errors.labels(kind=kind, handled=self._policy).inc()

    async def check(
        self,
        stage: Stage,
        session: Session,
        txn: Transaction | None = None,
        rcpt: Recipient | None = None,
    ) -> Verdict | None:
        """Apply the limits of ``stage``: None when all allow, else the refusal verdict."""
        state = session.state.get(LimiterState)
        entries: list[Entry] = []
        used: list[Limit] = []  # the limit of each entry, in order (exempt ones skipped)
        slots: list[tuple[str, str]] = []  # concurrency slots taken here: (key, token)
        plan = self._plans[stage]
        if plan:
            exempt = state.exempt
            if exempt is None:
                # The client's address does not change within a connection.
                exempt = state.exempt = bool(self.exempt) and self._exempt(self.exempt, session)
            if exempt:
                plan = ()
        for lim, key_of, interval in plan:
            if lim.exempt and self._exempt(lim.exempt, session):
                continue
            if session.auth_user is None and "auth_user" in lim.spec.kinds:
                continue  # a per-user limit: nobody to count
            key = key_of(session, txn, rcpt)
            if lim.concurrency is None:
                entries.append(RateEntry(key, interval, lim.burst))
            else:
                token = self._token(session, state)
                entries.append(SlotAcquire(key, token, lim.concurrency, self.concurrency_ttl))
                slots.append((key, token))
            used.append(lim)
        refreshes = self._refreshes(state) if state.slots else None
        if refreshes:
            entries += refreshes
        if not entries:
            return None
        now = self.clock()
        if slots:
            # Recorded before asking: if the call is cut short after Redis took
            # the slot, disconnect still gives it back.
            state.slots.extend(slots)
            state.refreshed = now
        if self._local is not None:
            results = self._local(entries, now)  # memory store: no I/O, cannot fail
        else:
            stored = await self._apply(entries)
            if stored is None:
                return None if self.fail_open else unavailable_verdict(stage)
            results = stored
        if any(results):  # refreshes are never refused: a wait belongs to a limit
            return self._refused(stage, state, used, results, len(slots))
        if refreshes:
            state.refreshed = now
        return None

    def _refused(
        self, stage: Stage, state: LimiterState, used: list[Limit], results: list[float], slots: int
    ) -> Verdict:
        refused = [lim for lim, wait in zip(used, results, strict=False) if wait > 0]
        for lim in refused:
            self.metrics.ratelimit_hits.labels(limit=lim.name).inc()
        if slots:
            del state.slots[-slots:]
        return refused_verdict(stage, refused[0])

    def _token(self, session: Session, state: LimiterState) -> str:
        # Unique per connection across processes and machines: the slot's member.
        if state.token is None:
            state.token = f"{session.id}.{self._instance}"
        return state.token

    def _refreshes(self, state: LimiterState) -> list[Entry]:
        held = state.slots
        if not held:
            return []
        now = self.clock()
        if now - state.refreshed < self.concurrency_ttl / 3:
            return []
        return [SlotRefresh(key, token, self.concurrency_ttl) for key, token in held]

    async def release(self, session: Session) -> None:
        """Give back the connection's concurrency slots (disconnect, however it ended)."""
        state = session.state.peek(LimiterState)
        if state is None or not state.slots:
            return
        held, state.slots = state.slots, []
        try:
            await self.store.release(held)
        except StoreError as err:
            # Not fatal: the slots expire after concurrency_ttl on their own.
            log.warning("rate-limit store failed releasing slots (%s): %s", err.kind, err)
            self.metrics.ratelimit_store_errors.labels(kind=err.kind, handled="expire").inc()

    async def hit(self, name: str, key: str, rate: Rate, burst: int) -> bool:
        """One GCRA step of a rule's own limit ``name`` on ``key``: True when allowed.

        For the rules engine (a rate-limit action keyed on message facts). The
        key is scoped by ``rule:NAME`` and hashed when long. On a store failure:
        True when failing open, False when failing closed.
        """
        allowed = await self.take(f"rule:{name}", key, rate.interval, max(1, burst))
        if not allowed:
            self.metrics.ratelimit_hits.labels(limit=name).inc()
        return allowed

    async def take(self, scope: str, key: str, interval: float, burst: int, cost: int = 1) -> bool:
        """One GCRA step of ``cost`` units on ``scope:key``: True when allowed (and then counted).

        ``cost`` 0 asks without counting: allowed while fewer than ``burst``
        units are in the bucket. On a store failure: True when failing open,
        False when failing closed (already logged and counted).
        """
        entry = RateEntry(scoped_key(scope, key), interval, burst, cost)
        results = await self._apply([entry])
        if results is None:
            return self.fail_open
        return not results[0]

    async def close(self) -> None:
        """Close the store."""
        await self.store.close()
