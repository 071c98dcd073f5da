"""The stage runner: order, first terminal verdict, scores, header edits, failures."""

from __future__ import annotations

import asyncio
import ipaddress

import pytest

from smtpproxy.metrics import Metrics
from smtpproxy.pipeline import Pipeline, order_checks
from smtpproxy.session import CheckResult, Recipient, Session, Transaction
from smtpproxy.stages import Check, CheckOutcome, Stage
from smtpproxy.verdict import Action, HeaderEdit, HeaderEditKind, Reply, Verdict


def session() -> Session:
    return Session("S1", ipaddress.ip_address("192.0.2.1"), 1234, "127.0.0.1", 25)


class Fixed(Check):
    def __init__(
        self, name: str, outcome: CheckOutcome, after: tuple[str, ...] = (), log: list[str] | None = None
    ):
        self.name, self.outcome, self.after, self.log = name, outcome, after, log if log is not None else []

    async def data(self, session: Session, txn: Transaction) -> CheckOutcome:
        self.log.append(self.name)
        return self.outcome


class Raises(Check):
    name = "boom"

    async def mail(self, session: Session, txn: Transaction) -> CheckOutcome:
        raise RuntimeError("bug")


class Hangs(Check):
    name = "slow"

    async def rcpt(self, session: Session, txn: Transaction, rcpt: Recipient) -> CheckOutcome:
        await asyncio.sleep(30)
        return None


def test_after_orders_checks_and_cycles_are_refused() -> None:
    a, b, c = Fixed("dmarc", None, after=("spf", "dkim")), Fixed("spf", None), Fixed("dkim", None)
    assert [x.name for x in order_checks([a, b, c])] == ["spf", "dkim", "dmarc"]
    with pytest.raises(ValueError, match="cycle"):
        order_checks([Fixed("x", None, after=("y",)), Fixed("y", None, after=("x",))])


async def test_first_terminal_verdict_wins_scores_add_edits_collect() -> None:
    log: list[str] = []
    edit1 = HeaderEdit(HeaderEditKind.ADD, "X-One", "1")
    edit2 = HeaderEdit(HeaderEditKind.ADD, "X-Two", "2")
    checks = [
        Fixed("a", Verdict(score=2.0, header_edits=(edit1,)), log=log),
        Fixed("b", CheckResult("b", "pass"), log=log),
        Fixed(
            "c",
            Verdict(Action.REJECT, Reply(550, "5.7.1", "no"), (edit2,), ("c_said_no",), score=1.5),
            log=log,
        ),
        Fixed("d", Verdict(Action.TEMPFAIL), log=log),
    ]
    txn = Transaction("T1", "a@b.example")
    outcome = await Pipeline(checks, Metrics(process=False)).run(Stage.DATA, session(), txn)
    assert log == ["a", "b", "c"]
    assert outcome.action is Action.REJECT and outcome.reply == Reply(550, "5.7.1", "no")
    assert outcome.decided_by == "c_said_no"
    assert outcome.header_edits == [edit1, edit2]
    assert txn.score == 3.5
    assert txn.results["b"].result == "pass"  # type: ignore[union-attr]


async def test_a_check_that_raises_becomes_451_430_not_a_pass() -> None:
    metrics = Metrics(process=False)
    outcome = await Pipeline([Raises()], metrics).run(Stage.MAIL, session(), Transaction("T", "a@b"))
    assert outcome.action is Action.TEMPFAIL and outcome.reply is not None
    assert outcome.reply.render() == "451 4.3.0 Temporary internal error, please try again later"
    assert metrics.check_errors.labels("boom", "error")._value.get() == 1


async def test_a_check_that_times_out_becomes_451_430() -> None:
    metrics = Metrics(process=False)
    pipeline = Pipeline([Hangs()], metrics, timeout=0.05)
    outcome = await pipeline.run(Stage.RCPT, session(), Transaction("T", "a@b"), Recipient("u@example.org"))
    assert outcome.action is Action.TEMPFAIL and outcome.decided_by == "slow_timeout"
    assert metrics.check_errors.labels("slow", "timeout")._value.get() == 1


async def test_on_error_continue_skips_the_failed_check() -> None:
    pipeline = Pipeline([Raises()], Metrics(process=False), on_error="continue")
    outcome = await pipeline.run(Stage.MAIL, session(), Transaction("T", "a@b"))
    assert outcome.action is Action.CONTINUE


async def test_accept_at_connect_skips_policy_for_the_session() -> None:
    class Allow(Check):
        name = "allow"

        async def connect(self, session: Session) -> CheckOutcome:
            return Verdict(Action.ACCEPT, reasons=("allowlist",))

    log: list[str] = []
    pipeline = Pipeline([Allow(), Fixed("deny", Verdict(Action.REJECT), log=log)], Metrics(process=False))
    s = session()
    await pipeline.run(Stage.CONNECT, s)
    outcome = await pipeline.run(Stage.DATA, s, Transaction("T", "a@b"))
    assert outcome.action is Action.CONTINUE and log == []


class Protective(Fixed):
    protective = True


async def test_accept_ends_filtering_never_protection() -> None:
    """After an accept, filtering checks are skipped; protective ones run and their refusal wins."""
    log: list[str] = []
    relay = Protective("relay", Verdict(Action.REJECT, Reply(550, "5.7.1", "Relay access denied")), log=log)
    filtering = Fixed("rules", Verdict(Action.REJECT), log=log)
    # The accept comes first in the stage: the protective check after it still runs.
    pipeline = Pipeline(
        [Fixed("allow", Verdict(Action.ACCEPT), log=log), relay, filtering], Metrics(process=False)
    )
    txn = Transaction("T", "a@b")
    outcome = await pipeline.run(Stage.DATA, session(), txn)
    assert outcome.action is Action.REJECT and outcome.decided_by == "relay"
    assert log == ["allow", "relay"]
    # Overridden by protection: the accept did not take effect for the transaction.
    assert txn.accepted_by is None


async def test_accept_in_an_earlier_stage_leaves_only_protective_checks() -> None:
    class Allow(Check):
        name = "allow"

        async def connect(self, session: Session) -> CheckOutcome:
            return Verdict(Action.ACCEPT, reasons=("allowlist",))

    log: list[str] = []
    limit = Protective(
        "limits", Verdict(Action.TEMPFAIL, Reply(452, "4.5.3", "Too many recipients")), log=log
    )
    pipeline = Pipeline(
        [Allow(), Fixed("rules", Verdict(Action.REJECT), log=log), limit], Metrics(process=False)
    )
    s = session()
    await pipeline.run(Stage.CONNECT, s)
    assert s.accepted_by == "allowlist"
    outcome = await pipeline.run(Stage.DATA, s, Transaction("T", "a@b"))
    assert outcome.action is Action.TEMPFAIL and outcome.reply == Reply(452, "4.5.3", "Too many recipients")
    assert log == ["limits"]
