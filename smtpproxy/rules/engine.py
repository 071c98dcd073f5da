"""RulesEngine: owns the current RuleSet, reloads it (SIGHUP, file watcher), builds the check.

The swap is one reference assignment: a transaction keeps the RuleSet it
captured at MAIL, so a reload never changes the rules of a message in flight.
A failed reload keeps the old rules running, logs every problem and counts it.
The ``ratelimit`` action counts through ``limiter``: the App passes its own, so
rules and the configured ``ratelimits`` share one store (memory or Redis).
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from smtpproxy.config import Config, ScoresConfig
from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.limiter import RateLimiter
from smtpproxy.ratelimit.memory import MemoryStore
from smtpproxy.rules.check import DnsResolver, RulesCheck
from smtpproxy.rules.loader import Problem, RulesError
from smtpproxy.rules.ruleset import RuleSet, empty_ruleset, load_ruleset

log = logging.getLogger("smtpproxy.rules")

# Slots of the in-memory limiter an engine makes for itself (no App limiter): 1 MB.
OWN_LIMITER_KEYS = 65_536
MAX_WATCHED = 10_000  # files looked at per poll; a folder with more is watched partially
Snapshot = tuple[tuple[str, int, int], ...]


def folder_snapshot(folder: Path | None) -> Snapshot:
    """(path, mtime_ns, size) of every file under ``folder``; empty when it does not exist (or is None)."""
    out: list[tuple[str, int, int]] = []
    if folder is None:
        return ()
    try:
        for path in folder.rglob("*"):
            if len(out) >= MAX_WATCHED:
                break
            try:
                st = path.stat()
            except OSError:
                continue
            if path.is_file():
                out.append((str(path.relative_to(folder)), st.st_mtime_ns, st.st_size))
    except OSError:
        return ()
    return tuple(sorted(out))


def _load(folder: Path | None) -> RuleSet:
    # None is the config's `rules: null`: no rules, on purpose. A folder that is
    # gone (moved, deleted) is an error, so a reload keeps the old rules instead
    # of switching filtering off.
    if folder is None:
        return empty_ruleset()
    if not folder.exists():
        raise RulesError([Problem(str(folder), 0, "", "no such folder (rules: null means no rules)")])
    return load_ruleset(folder)


def memory_limiter(metrics: Metrics, store: MemoryStore | None = None) -> RateLimiter:
    """A limiter with no configured limits on an in-memory store: for rules' ``ratelimit`` alone."""
    return RateLimiter([], store if store is not None else MemoryStore(OWN_LIMITER_KEYS), metrics)


class RulesEngine:
    """The rules of one App: ``current`` RuleSet, ``check`` to register, ``reload()`` and ``watch()``.

    ``limiter`` serves the ``ratelimit`` action; without one the engine uses
    its own in-memory limiter (per process). ``folder`` None (``rules: null``)
    means no rules: nothing to load, watch or reload.
    """

    def __init__(
        self,
        folder: Path | None,
        metrics: Metrics,
        *,
        resolver: DnsResolver | None = None,
        scores: ScoresConfig | None = None,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.folder = folder
        self.metrics = metrics
        self.resolver = resolver
        self.scores = scores or ScoresConfig()
        self.limiter = limiter if limiter is not None else memory_limiter(metrics)
        self.current: RuleSet = empty_ruleset()
        self.check = RulesCheck(self)
        self.last_error: RulesError | None = None
        self._seen: Snapshot = ()

    def load(self) -> RuleSet:
        """Initial load: raise RulesError on a bad folder (the CLI exits 2)."""
        seen = folder_snapshot(self.folder)
        ruleset = _load(self.folder)
        self._install(ruleset, seen)
        return ruleset

    def _install(self, ruleset: RuleSet, seen: Snapshot) -> None:
        self.current = ruleset  # the atomic swap
        self._seen = seen
        self.last_error = None
        self.metrics.rules_loaded.set(len(ruleset))
        self.metrics.rules_last_reload.set(time.time())
        self.metrics.rule_reloads.labels("success").inc()
        log.info(
            "rules loaded: %d rules from %d files in %s",
            len(ruleset),
            len(ruleset.files),
            self.folder or "nowhere (rules: null)",
        )

    def _failed(self, err: RulesError, seen: Snapshot) -> None:
        self._seen = seen  # do not retry (and re-log) until the files change again
        self.last_error = err
        self.metrics.rule_reloads.labels("failure").inc()
        for problem in err.problems:
            log.error(
                "rules reload failed, keeping the %d old rules: %s", len(self.current), problem.render()
            )

    def reload(self) -> bool:
        """Reload now (SIGHUP): True on success; on failure the old rules keep running."""
        seen = folder_snapshot(self.folder)
        try:
            ruleset = _load(self.folder)
        except RulesError as err:
            self._failed(err, seen)
            return False
        self._install(ruleset, seen)
        return True

    async def reload_async(self) -> bool:
        """Like reload(), compiling in a worker thread so big list files do not stall sessions."""
        seen = await asyncio.to_thread(folder_snapshot, self.folder)
        try:
            ruleset = await asyncio.to_thread(_load, self.folder)
        except RulesError as err:
            self._failed(err, seen)
            return False
        self._install(ruleset, seen)
        return True

    def changed(self) -> bool:
        """True when a file in the folder changed since the last load attempt."""
        return folder_snapshot(self.folder) != self._seen

    async def watch(self, interval: float) -> None:
        """Poll the folder every ``interval`` seconds and reload on change; runs until cancelled."""
        if interval <= 0 or self.folder is None:
            return
        while True:
            await asyncio.sleep(interval)
            try:
                if await asyncio.to_thread(self.changed):
                    await self.reload_async()
            except Exception:  # the watcher must outlive any surprise; the old rules keep running
                log.exception("rules watcher: reload failed")


def build_rules_engine(
    config: Config, resolver: DnsResolver | None, metrics: Metrics, limiter: RateLimiter | None = None
) -> RulesEngine:
    """The App's rules engine, loaded; raises RulesError when the rules folder is bad.

    ``limiter``: the App's RateLimiter, so the ``ratelimit`` action uses the configured store.
    """
    engine = RulesEngine(config.rules_path, metrics, resolver=resolver, scores=config.scores, limiter=limiter)
    engine.load()
    return engine
