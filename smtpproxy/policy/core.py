"""The transaction policy of one SMTP session, written once, with no I/O of its own.

The drivers (the aiosmtpd front end in :mod:`smtpproxy.handler`, ``smtpproxy
check``, ``smtpproxy rules test``) feed a :class:`SessionPolicy` the session's
events in order and carry out what it decides: a reply to give, or a command to
pass on to the backend, whose reply they report back. None of them decides.

Events and decisions:

================ ==================================== =========================================
event            method                               decision
================ ==================================== =========================================
connect          ``connect()``                        serve, or refuse (and close)
HELO/EHLO        ``helo(name, esmtp)``                ok, or refuse
MAIL             ``mail(sender, params)``             forward (with the extensions it needs),
                                                      or refuse; then ``mail_answered(reply)``
RCPT             ``rcpt(address, params)``            forward or refuse; then
                                                      ``rcpt_answered(address, params, reply)``
end of DATA      ``data(message)``                    a :class:`Delivery`: refuse, discard,
                                                      deliver or quarantine (bytes to send);
                                                      then ``delivered(delivery, reply)``
an error reply   ``command_error(kind)``              a delay (tarpit), or close (421)
RSET/QUIT/...    ``end(word, stage, reason)``         the transaction is over (logged, counted)
disconnect       ``disconnect()``                     checks release what they hold
================ ==================================== =========================================

Checks are awaited through the pipeline (DNS, Redis), but nothing here touches
a socket. The one log line and the ``messages`` count of each transaction are
written here, so every front end logs and counts the same way.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import smtpproxy.policy.dsn as dsn
from smtpproxy import replies
from smtpproxy.backend.queueid import queue_id
from smtpproxy.headers import apply_edits, header_values, received_header, sanitize
from smtpproxy.logs import EventLog
from smtpproxy.metrics import Metrics
from smtpproxy.pipeline import Pipeline
from smtpproxy.policy.combine import combine
from smtpproxy.policy.submission import Submission
from smtpproxy.ratelimit.session_limits import SessionLimits
from smtpproxy.rules.facts import drop_content_facts
from smtpproxy.session import Recipient, Session, Transaction, new_id
from smtpproxy.stages import Stage
from smtpproxy.verdict import Action, HeaderEdit, Reply, StageOutcome

# Control characters are legal in quoted local parts on paper, but no real
# address has them, they cannot be passed on (nor safely logged): refuse them.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

_REFUSING = (Action.REJECT, Action.TEMPFAIL)


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one command.

    ``reply`` None means: pass the command on to the backend and answer with
    the backend's own reply. ``delay``: wait that long before answering (the
    tarpit). ``needs``: at MAIL and RCPT, the extensions the backend must
    offer for this command (8BITMIME, SMTPUTF8, DSN).
    ``reason``: the check, rule or limit that refused (logs and reports).
    """

    reply: Reply | None = None
    disconnect: bool = False
    delay: float = 0.0
    needs: frozenset[str] = frozenset()
    reason: str = ""

    @property
    def forward(self) -> bool:
        """True when the command goes on to the backend."""
        return self.reply is None


FORWARD = Decision()


@dataclass(frozen=True, slots=True)
class Delivery:
    """What becomes of a message at the end of DATA.

    ``message`` None: the message goes nowhere and ``reply`` is the answer
    (refused, or discarded with a 250). Otherwise ``message`` is what to send,
    trace header and header edits applied, to ``destination`` (a quarantine)
    or, when None, to the backend transaction, whose reply the client gets.
    """

    action: Action
    reason: str
    reply: Reply | None = None
    message: bytes | None = None
    destination: str | None = None
    disconnect: bool = False
    header_edits: tuple[HeaderEdit, ...] = ()


def _short(reply: Reply) -> str:
    """A reply as the log line gives a command's: code and enhanced code (``250 2.1.5``)."""
    return f"{reply.code} {reply.enhanced}".strip()


# What a driver whose MTA is itself the backend reports as the backend's answer:
# the milter (the MTA asks us only about what it accepted) and the offline tools.
MTA_MAIL_OK = Reply(250, "2.1.0", "Ok")
MTA_RCPT_OK = Reply(250, "2.1.5", "Ok")


def result_word(reply: Reply) -> str:
    """The log and metric word for a transaction the backend (or a quarantine) answered."""
    return "delivered" if reply.is_positive else "tempfailed" if reply.is_transient else "rejected"


class Policy:
    """What every session of one application shares: the checks, the session limits, logs and metrics."""

    def __init__(
        self,
        pipeline: Pipeline,
        session_limits: SessionLimits,
        metrics: Metrics,
        logs: EventLog,
        hostname: str,
        forged_ar: Callable[[bytes], bool],
        mode: str = "proxy",
        *,
        submission: Submission | None = None,
    ) -> None:
        self.mode = mode  # proxy or milter: in every transaction's log line and in messages_by_mode
        self.pipeline = pipeline
        # The submission port's own policy and pipeline; None when submission is off.
        self.submission = submission
        self.session_limits = session_limits
        self.metrics = metrics
        self.logs = logs
        self.hostname = hostname
        self.forged_ar = forged_ar

    def session(self, facts: Session) -> SessionPolicy:
        """The policy of one new connection."""
        return SessionPolicy(self, facts)


class SessionPolicy:
    """One connection's policy state: the open transaction and what was decided for it."""

    def __init__(self, policy: Policy, session: Session) -> None:
        self.policy = policy
        self.session = session
        # Submission sessions run their own checks (no SPF/DKIM/DMARC verdicts on outbound mail).
        self.submission = policy.submission if session.submission else None
        self.pipeline = self.submission.pipeline if self.submission is not None else policy.pipeline
        self.txn: Transaction | None = None  # the transaction the backend accepted MAIL for
        self._pending: Transaction | None = None  # MAIL allowed, the backend not asked yet
        self._mail_outcome: StageOutcome | None = None
        self._rcpt_outcomes: list[StageOutcome] = []
        self._rcpt_outcome: StageOutcome | None = None  # of the RCPT the backend is asked about
        self.rcpt_log: list[tuple[str, str, tuple[str, ...]]] = []
        self.last: Transaction | None = None  # the transaction that ended last (for reports)

    # -- connection ---------------------------------------------------------------

    async def connect(self) -> Decision:
        """Before the banner: serve the client, or refuse it and close."""
        outcome = await self.pipeline.run(Stage.CONNECT, self.session)
        if outcome.action in _REFUSING:
            self.policy.metrics.connections_rejected.labels(outcome.decided_by or "policy").inc()
            reason = outcome.decided_by or "policy"
            return Decision(outcome.reply or replies.CONNECTION_REFUSED, disconnect=True, reason=reason)
        return FORWARD

    async def helo(self, name: str, *, esmtp: bool) -> Decision:
        """HELO/EHLO (an open transaction must have been ended first)."""
        self.session.helo = name
        self.session.esmtp = esmtp
        outcome = await self.pipeline.run(Stage.HELO, self.session)
        if outcome.action in _REFUSING:
            self.session.helo = None
            return self._refusal(outcome)
        return FORWARD

    async def disconnect(self) -> None:
        """The connection closed, however it closed: checks release what they hold."""
        await self.pipeline.run(Stage.DISCONNECT, self.session)

    # -- envelope -----------------------------------------------------------------

    async def mail(self, sender: str, params: tuple[str, ...]) -> Decision:
        """MAIL FROM (``sender`` without brackets, "" for the null sender)."""
        if _CONTROL_CHARS.search(sender):
            return Decision(replies.BAD_SENDER, reason="syntax")
        refusal, wants_dsn = dsn.check_mail(params, offered=self.session.dsn_offered)
        if refusal is not None:
            return Decision(refusal, reason="dsn")
        txn = Transaction(new_id(), sender, params)
        if self.submission is not None:
            refused = self.submission.mail(self.session, sender)
            if refused is not None:
                reason = "auth_required" if refused.code == 530 else "sender_login"
                self._log_refused_mail(txn, reason, refused)
                return Decision(refused, reason=reason)
        limits = self.policy.session_limits
        limited = limits.duration_exceeded(self.session, time.monotonic())
        if limited is not None and limited.reply is not None:
            return Decision(limited.reply, disconnect=True, reason=limited.reasons[0])
        outcome = await self.pipeline.run(Stage.MAIL, self.session, txn)
        if outcome.action in _REFUSING:
            reply = outcome.reply or replies.default_reply(outcome.action)
            self._log_refused_mail(txn, outcome.decided_by, reply)
            return self._refusal(outcome)
        self._pending, self._mail_outcome, self._rcpt_outcomes = txn, outcome, []
        needs = frozenset(
            name
            for name, present in (
                ("8BITMIME", "BODY=8BITMIME" in params),
                ("SMTPUTF8", "SMTPUTF8" in params),
                (dsn.DSN, wants_dsn),
            )
            if present
        )
        return Decision(needs=needs)

    def mail_answered(self, reply: Reply) -> None:
        """The backend's reply to the MAIL that ``mail`` forwarded (or why it could not be asked)."""
        txn, self._pending = self._pending, None
        if txn is None:
            return
        txn.mail_reply = _short(reply)
        if reply.is_positive:
            self.txn = txn
            self.session.transactions += 1
        else:
            self._log_refused_mail(txn, "backend", reply)

    async def rcpt(self, address: str, params: tuple[str, ...]) -> Decision:
        """RCPT TO: refuse it here, or pass it on to the backend."""
        txn = self.txn
        if txn is None:
            return Decision(replies.NEED_MAIL, reason="syntax")
        if _CONTROL_CHARS.search(address):
            return Decision(replies.BAD_RECIPIENT, reason="syntax")
        refusal, wants_dsn = dsn.check_rcpt(params, offered=self.session.dsn_offered)
        if refusal is not None:
            return Decision(refusal, reason="dsn")
        limited = self.policy.session_limits.duration_exceeded(self.session, time.monotonic())
        if limited is not None and limited.reply is not None:
            return Decision(limited.reply, disconnect=True, reason=limited.reasons[0])
        outcome = await self.pipeline.run(Stage.RCPT, self.session, txn, Recipient(address, params))
        if outcome.action in _REFUSING:
            reply = outcome.reply or replies.default_reply(outcome.action)
            counted = self._count_rcpt(address, params, reply)
            if counted.reply is not None:
                return counted
            return Decision(reply, outcome.disconnect, counted.delay, reason=outcome.decided_by)
        self._rcpt_outcome = outcome if outcome.action is not Action.CONTINUE else None
        return Decision(needs=frozenset({dsn.DSN})) if wants_dsn else FORWARD

    async def mail_here(self, sender: str, params: tuple[str, ...]) -> Decision:
        """MAIL when the MTA asking is the backend (milter, offline): decided and answered at once."""
        decision = await self.mail(sender, params)
        if decision.forward:
            self.mail_answered(MTA_MAIL_OK)
        return decision

    async def rcpt_here(self, address: str, params: tuple[str, ...]) -> Decision:
        """RCPT when the MTA asking is the backend: ``rcpt`` and ``rcpt_answered`` with its acceptance."""
        decision = await self.rcpt(address, params)
        if decision.forward:
            decision = self.rcpt_answered(address, params, MTA_RCPT_OK)
        return decision

    def rcpt_answered(self, address: str, params: tuple[str, ...], reply: Reply) -> Decision:
        """The backend's reply to a forwarded RCPT.

        The decision's ``reply`` is None to pass the backend's reply on (after
        ``delay``), or the 421 that replaces it when a session limit is passed.
        """
        txn, outcome, self._rcpt_outcome = self.txn, self._rcpt_outcome, None
        counted = self._count_rcpt(address, params, reply)
        if counted.reply is None and txn is not None and reply.is_positive:
            txn.recipients.append(Recipient(address, params))
            if outcome is not None:
                self._rcpt_outcomes.append(outcome)
        return counted

    def command_error(self, kind: str) -> Decision:
        """An error reply of ``kind`` (see SessionLimits.on_command_error): tarpit, or close at a limit."""
        limits = self.policy.session_limits
        verdict = limits.on_command_error(self.session, kind)
        delay = limits.tarpit_delay(self.session)
        if verdict is not None and verdict.reply is not None:
            return Decision(verdict.reply, disconnect=True, delay=delay, reason=verdict.reasons[0])
        return Decision(delay=delay)

    def junk_command(self) -> Decision:
        """A command that moves no mail on (NOOP, RSET, VRFY, EXPN, HELP, a repeated HELO): 421 at the limit."""
        verdict = self.policy.session_limits.on_junk_command(self.session)
        if verdict is None or verdict.reply is None:
            return FORWARD
        return Decision(verdict.reply, disconnect=True, reason=verdict.reasons[0])

    # -- content ------------------------------------------------------------------

    async def data(self, message: bytes) -> Delivery:
        """End of DATA: what becomes of ``message`` (the transaction must be open)."""
        txn = self.txn
        assert txn is not None, "data() needs an open transaction"
        txn.message = message
        ids = header_values(message, "message-id")
        txn.message_id = sanitize(ids[0], limit=250) if ids else None
        self.session.messages += 1
        self.policy.metrics.message_size.observe(len(message))
        if self.submission is not None:
            mismatch = self.submission.content(self.session, message)
            if mismatch is not None:
                return Delivery(Action.REJECT, "sender_login", mismatch)
        outcome = await self.pipeline.run(Stage.DATA, self.session, txn)
        drop_content_facts(txn)  # what the rules decoded of the content: no check reads it any more
        final = combine(
            outcome, self._mail_outcome, self._rcpt_outcomes, txn.accepted_by or self.session.accepted_by
        )
        action, reason = final.action, final.decided_by
        edits = tuple(final.header_edits)
        if action in _REFUSING:
            reply = final.reply or replies.default_reply(action)
            return Delivery(
                action, reason or action.word, reply, disconnect=final.disconnect, header_edits=edits
            )
        if action is Action.DISCARD:
            return Delivery(action, reason or "discard", replies.discarded(txn.id), header_edits=edits)
        show_user = self.submission is not None and self.submission.config.received_user
        trace = received_header(self.session, txn, self.policy.hostname, show_user=show_user)
        # Incoming Authentication-Results claiming our authserv-id are forgeries.
        content = apply_edits(message, final.header_edits, prepend=trace, drop=self.policy.forged_ar)
        if self.submission is not None:
            content = await self.submission.sign(self.session, content)
        # What goes out replaces what came in: one copy is held while it is sent.
        txn.message = content
        if action is Action.QUARANTINE:
            return Delivery(
                action, reason or "quarantine", None, content, final.quarantine_to, header_edits=edits
            )
        return Delivery(action, reason or "clean", None, content, header_edits=edits)

    def delivered(self, delivery: Delivery, reply: Reply, *, client_gone: bool = False) -> None:
        """The backend's (or the quarantine's) reply to the message ``data`` decided to send.

        ``client_gone``: the client left while the backend had the message; SMTP
        cannot tell it any more, so the backend's reply (its queue id) is logged.
        """
        if self.txn is not None and reply.is_positive:
            self.txn.queue_id = queue_id(reply)
        if delivery.destination is not None:
            self.end("quarantined" if reply.is_positive else "tempfailed", "data", delivery.reason, reply)
        elif client_gone:
            self.end(result_word(reply), "data", "client_lost_before_reply", reply)
        elif reply.is_positive:
            # As Postfix does: junk commands are counted again from a delivery on.
            self.session.junk_commands = 0
            word = "quarantined" if delivery.action is Action.QUARANTINE else "delivered"
            self.end(word, "data", delivery.reason, reply)
        else:
            self.end(result_word(reply), "data", "backend", reply)

    def refused(self, delivery: Delivery) -> None:
        """A message ``data`` refused or discarded: the transaction is over."""
        word = {Action.DISCARD: "discarded", Action.REJECT: "rejected"}.get(delivery.action, "tempfailed")
        self.end(word, "data", delivery.reason, delivery.reply)

    # -- the end of a transaction ---------------------------------------------------

    def end(self, word: str, stage: str, reason: str, reply: Reply | None = None) -> None:
        """The open transaction is over: one log line and one count. Safe without one."""
        txn, self.txn, self._pending = self.txn, None, None
        self._mail_outcome, self._rcpt_outcomes, self._rcpt_outcome = None, [], None
        if txn is None:
            return
        self.last = txn
        self.policy.metrics.messages.labels(word, stage, reason).inc()
        self.policy.metrics.messages_by_mode.labels(self.policy.mode, word).inc()
        self.policy.logs.transaction(
            self.session, txn, word, stage, reason, reply, self.rcpt_log, mode=self.policy.mode
        )
        self.rcpt_log = []

    # -- helpers ------------------------------------------------------------------

    def _refusal(self, outcome: StageOutcome) -> Decision:
        reply = outcome.reply or replies.default_reply(outcome.action)
        return Decision(reply, disconnect=outcome.disconnect, reason=outcome.decided_by)

    def _count_rcpt(self, address: str, params: tuple[str, ...], reply: Reply) -> Decision:
        """Count a recipient's outcome: the tarpit delay, and a 421 when rejections pass the limit."""
        outcome = "accepted" if reply.is_positive else "tempfailed" if reply.is_transient else "rejected"
        self.policy.metrics.recipients.labels(outcome).inc()
        self.rcpt_log.append((address, _short(reply), params))
        if outcome != "rejected":
            return FORWARD
        return self.command_error("rejected_rcpt")

    def _log_refused_mail(self, txn: Transaction, reason: str, reply: Reply) -> None:
        """A transaction that ended at MAIL: the same action words as every other stage."""
        self.last = txn
        txn.mail_reply = _short(reply)
        word = "tempfailed" if reply.is_transient else "rejected"
        self.policy.metrics.messages.labels(word, "mail", reason).inc()
        self.policy.metrics.messages_by_mode.labels(self.policy.mode, word).inc()
        self.policy.logs.transaction(
            self.session, txn, word, "mail", reason, reply, [], mode=self.policy.mode
        )
