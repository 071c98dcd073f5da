"""The milter-style stage runner: run the checks of a stage in order, combine their verdicts.

Rules of combination: checks run in declared order (``after`` dependencies
respected); a ``CheckResult`` is recorded; a ``Verdict``'s score adds up and its
header edits collect; the first terminal verdict ends the stage. A check that
raises or times out becomes a tempfail (451 4.3.0) by default, never a silent
pass and never a 5xx caused by our own bug.

An ACCEPT ends *filtering* for its scope (the connection when given at connect
or HELO, the transaction otherwise), never protection: the protective checks
(relay, limits, rate limits) still run in that stage and every later one, and
their refusal overrides the accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable

from smtpproxy.metrics import Metrics
from smtpproxy.replies import INTERNAL_ERROR
from smtpproxy.session import CheckResult, Recipient, Session, SessionResults, Transaction
from smtpproxy.stages import Check, CheckOutcome, Stage
from smtpproxy.verdict import Action, StageOutcome, Verdict

log = logging.getLogger("smtpproxy.pipeline")


def order_checks(checks: list[Check]) -> list[Check]:
    """Stable topological order by ``after``; unknown names in ``after`` are ignored."""
    by_name = {c.name: c for c in checks}
    ordered: list[Check] = []
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(check: Check) -> None:
        if check.name in done:
            return
        if check.name in visiting:
            raise ValueError(f"checks depend on each other in a cycle through {check.name!r}")
        visiting.add(check.name)
        for dep in check.after:
            if dep in by_name:
                visit(by_name[dep])
        visiting.discard(check.name)
        done.add(check.name)
        ordered.append(check)

    for c in checks:
        visit(c)
    return ordered


class Pipeline:
    """Runs the registered checks of each stage; built once per App."""

    def __init__(
        self, checks: list[Check], metrics: Metrics, *, timeout: float = 20.0, on_error: str = "tempfail"
    ) -> None:
        self.checks = order_checks(checks)
        self.metrics = metrics
        self.timeout = timeout
        self.on_error = on_error
        self._by_stage = {stage: [c for c in self.checks if c.handles(stage)] for stage in Stage}
        self._protective = {stage: [c for c in cs if c.protective] for stage, cs in self._by_stage.items()}
        self._pure = {stage: all(c.pure for c in checks) for stage, checks in self._by_stage.items()}
        # Stages where some check may be inactive (it overrides ``active``): only
        # those filter per run; elsewhere every check of the stage runs.
        self._gated = {
            stage: any(type(c).active is not Check.active for c in checks)
            for stage, checks in self._by_stage.items()
        }
        self._stage_hist = {stage: metrics.stage_duration.labels(stage.value) for stage in Stage}
        self._check_hist = {c.name: metrics.check_duration.labels(c.name) for c in self.checks if c.timed}

    async def run(
        self,
        stage: Stage,
        session: Session,
        txn: Transaction | None = None,
        rcpt: Recipient | None = None,
    ) -> StageOutcome:
        """Run every check of ``stage``; return the combined outcome."""
        outcome = StageOutcome()
        accepted = session.accepted_by is not None or (txn is not None and txn.accepted_by is not None)
        # An ACCEPT earlier in the session or transaction: only protection is left.
        checks = self._protective[stage] if accepted else self._by_stage[stage]
        if self._gated[stage]:
            checks = [c for c in checks if c.active(stage)]
        if not checks:
            return outcome
        started = time.perf_counter()
        current = checks[0]
        try:
            # One deadline for the stage: cheaper than one per check, and the
            # check running when it passes is the one that gets the blame.
            pure = self._pure[stage] or all(c.pure for c in checks)
            deadline = contextlib.nullcontext() if pure else asyncio.timeout(self.timeout)
            async with deadline:
                for check in checks:
                    if accepted and not check.protective:
                        continue
                    current = check
                    result = await self._call(check, stage, session, txn, rcpt)
                    if result is None:
                        continue
                    if isinstance(result, CheckResult):
                        if txn is not None:
                            txn.add_result(result)
                        else:
                            session.state.get(SessionResults).results[result.check] = result
                        continue
                    if self._merge(outcome, result, check.name, txn):
                        if outcome.action is not Action.ACCEPT:
                            break
                        # Accepted: the protective checks left in this stage still run.
                        accepted = True
        except TimeoutError:
            failed = self._failed(current, "timeout", session, txn)
            if failed is not None:
                self._merge(outcome, failed, current.name, txn)
        finally:
            self._stage_hist[stage].observe(time.perf_counter() - started)
        if outcome.action is Action.ACCEPT:
            # Only an accept that no protective check overrode takes effect.
            if stage in (Stage.CONNECT, Stage.HELO) or txn is None:
                session.accepted_by = outcome.decided_by
            else:
                txn.accepted_by = outcome.decided_by
        return outcome

    def _merge(self, outcome: StageOutcome, verdict: Verdict, name: str, txn: Transaction | None) -> bool:
        """Fold one verdict into the outcome; True when the stage ends here."""
        outcome.header_edits.extend(verdict.header_edits)
        outcome.score += verdict.score
        if txn is not None and verdict.score:
            txn.score += verdict.score
        if not verdict.is_terminal:
            outcome.reasons.extend(verdict.reasons)
            return False
        outcome.action = verdict.action
        outcome.reply = verdict.reply
        outcome.reasons.extend(verdict.reasons or (name,))
        outcome.decided_by = (verdict.reasons or (name,))[0]
        outcome.disconnect = verdict.disconnect
        outcome.quarantine_to = verdict.quarantine_to
        return True

    async def _call(
        self, check: Check, stage: Stage, session: Session, txn: Transaction | None, rcpt: Recipient | None
    ) -> CheckOutcome:
        if not check.timed:
            try:
                return await _dispatch(check, stage, session, txn, rcpt)
            except Exception:
                log.exception("check %s failed at %s (session %s)", check.name, stage.value, session.id)
                return self._failed(check, "error", session, txn)
        started = time.perf_counter()
        try:
            return await _dispatch(check, stage, session, txn, rcpt)
        except Exception:
            log.exception(
                "check %s failed at %s (session %s, transaction %s)",
                check.name,
                stage.value,
                session.id,
                txn.id if txn else "-",
            )
            return self._failed(check, "error", session, txn)
        finally:
            self._check_hist[check.name].observe(time.perf_counter() - started)

    def _failed(self, check: Check, kind: str, session: Session, txn: Transaction | None) -> Verdict | None:
        self.metrics.check_errors.labels(check.name, kind).inc()
        if kind == "timeout":
            log.warning("check %s timed out (session %s)", check.name, session.id)
        if self.on_error == "continue":
            return None
        return Verdict(Action.TEMPFAIL, INTERNAL_ERROR, reasons=(f"{check.name}_{kind}",))


def _dispatch(
    check: Check, stage: Stage, session: Session, txn: Transaction | None, rcpt: Recipient | None
) -> Awaitable[CheckOutcome]:
    """The call of the method of ``check`` for ``stage`` with what that stage provides.

    Returned, not awaited: one coroutine frame less per check and stage.
    ``disconnect`` returns None, as a check's outcome at that stage must be.
    """
    if stage is Stage.CONNECT:
        return check.connect(session)
    if stage is Stage.HELO:
        return check.helo(session)
    if stage is Stage.DISCONNECT:
        return check.disconnect(session)
    assert txn is not None
    if stage is Stage.MAIL:
        return check.mail(session, txn)
    if stage is Stage.RCPT:
        assert rcpt is not None
        return check.rcpt(session, txn, rcpt)
    return check.data(session, txn)
