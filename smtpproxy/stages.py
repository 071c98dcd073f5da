"""Every stage of an SMTP session, and what a check receives there.

A check is a small class with one ``async`` method per stage it cares about
(mitmproxy addons, Haraka hooks). The pipeline finds which methods a check
overrides and calls only those. Each method returns a ``Verdict`` (a decision),
a ``CheckResult`` (a fact, recorded on the transaction), or None.

=========== ========================================= ==============================
Stage       method                                    when
=========== ========================================= ==============================
CONNECT     ``connect(session)``                      before the banner
HELO        ``helo(session)``                         after HELO/EHLO (session.helo set)
MAIL        ``mail(session, txn)``                    MAIL FROM, before the backend sees it
RCPT        ``rcpt(session, txn, rcpt)``              each RCPT TO, before the backend sees it
DATA        ``data(session, txn)``                    end of message, before the backend sees it
DISCONNECT  ``disconnect(session)``                   connection closed, however it closed
=========== ========================================= ==============================
"""

from __future__ import annotations

import enum

from smtpproxy.session import CheckResult, Recipient, Session, Transaction
from smtpproxy.verdict import Verdict

CheckOutcome = Verdict | CheckResult | None


class Stage(enum.Enum):
    """A point in the SMTP dialogue where checks run."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"
    DISCONNECT = "disconnect"


class Check:
    """Base class of checks: override the stage methods you need.

    ``name`` is a short word (metric label, log reason); ``after`` lists names
    of checks that must run before this one in the same stage (DMARC after SPF
    and DKIM).
    """

    name: str = "check"
    after: tuple[str, ...] = ()
    # A pure check does no I/O and cannot hang: a stage of pure checks runs
    # without a deadline. ``timed``: the check has its own latency histogram
    # (core policy checks do not; the stage's histogram covers them).
    pure: bool = False
    timed: bool = True
    # A protective check (relay, limits, rate limits) runs even after an ACCEPT:
    # accept ends *filtering* (authentication enforcement, rules, scores) for its
    # scope, never the protection of the operator (DESIGN.md).
    protective: bool = False

    async def connect(self, session: Session) -> CheckOutcome:
        """Connection stage; default: nothing to say."""
        return None

    async def helo(self, session: Session) -> CheckOutcome:
        """HELO/EHLO stage."""
        return None

    async def mail(self, session: Session, txn: Transaction) -> CheckOutcome:
        """MAIL FROM stage."""
        return None

    async def rcpt(self, session: Session, txn: Transaction, rcpt: Recipient) -> CheckOutcome:
        """RCPT TO stage, once per recipient."""
        return None

    async def data(self, session: Session, txn: Transaction) -> CheckOutcome:
        """End-of-DATA stage: ``txn.message`` holds the whole message."""
        return None

    async def disconnect(self, session: Session) -> None:
        """Connection closed: release whatever the check holds for the session."""
        return None

    def active(self, stage: Stage) -> bool:
        """Whether the check has work at ``stage`` right now (e.g. rules loaded for it).

        Asked on every run, so it must be cheap; a stage whose checks are all
        inactive costs nothing.
        """
        return True

    def handles(self, stage: Stage) -> bool:
        """True when this check overrides the method of ``stage``."""
        method = getattr(type(self), stage.value)
        return method is not getattr(Check, stage.value)
