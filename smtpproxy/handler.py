"""One client connection's SMTP dialogue: local policy, then the backend's own replies.

aiosmtpd calls the ``handle_*`` hooks; each runs the pipeline stage and, when
local policy lets the command through, relays it to the backend transaction
and returns the backend's reply (DESIGN.md: mirror the backend per
transaction; never answer 250 to DATA before the backend did).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from typing import TYPE_CHECKING, Any

from smtpproxy.backend import BackendTransaction, ClientFacts
from smtpproxy.headers import apply_edits, received_header
from smtpproxy.pipeline import INTERNAL_ERROR
from smtpproxy.rules.facts import drop_content_facts
from smtpproxy.session import Recipient, Session, Transaction, new_id
from smtpproxy.stages import Stage
from smtpproxy.verdict import Action, Reply, StageOutcome

if TYPE_CHECKING:
    from smtpproxy.app import App

log = logging.getLogger("smtpproxy.handler")

# Control characters are legal in quoted local parts on paper, but no real
# address has them, they cannot be passed on (nor safely logged): refuse them.
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")

OK = Reply(250, "2.0.0", "Ok")
DEFAULT_REJECT = Reply(550, "5.7.1", "Message rejected by policy")
DEFAULT_TEMPFAIL = Reply(451, "4.7.1", "Message deferred by policy, please try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, please try again later")


def _default_reply(action: Action) -> Reply:
    return DEFAULT_TEMPFAIL if action is Action.TEMPFAIL else DEFAULT_REJECT


class ConnectionHandler:
    """The aiosmtpd handler of one connection; owns the Session and the open transaction."""

    def __init__(self, app: App, session: Session) -> None:
        self.app = app
        self.session = session
        self.txn: Transaction | None = None
        self.btx: BackendTransaction | None = None
        self.rcpt_log: list[tuple[str, str]] = []
        self.close_after_reply = False
        self.busy = False  # a command is being processed: the idle timer must not fire
        self.data_task: asyncio.Future[Reply] | None = None  # content on its way to the backend

    # -- helpers ------------------------------------------------------------

    def _facts(self) -> ClientFacts:
        s = self.session
        return ClientFacts(ip=s.client_address, helo=s.helo, rdns=s.rdns, esmtp=s.esmtp)

    def _refuse(self, outcome: StageOutcome) -> str:
        reply = outcome.reply or _default_reply(outcome.action)
        if outcome.disconnect:
            self.close_after_reply = True
        return reply.render()

    async def end_transaction(self, action: str, stage: str, reason: str, reply: Reply | None) -> None:
        """Close the backend side, log one line, count it. Safe to call twice."""
        txn, btx = self.txn, self.btx
        self.txn, self.btx = None, None
        if btx is not None:
            try:
                await btx.finish()
            except Exception:
                log.exception("releasing backend transaction failed")
        if txn is None:
            return
        self.app.metrics.messages.labels(action, stage, reason).inc()
        self.app.logs.transaction(self.session, txn, action, stage, reason, reply, self.rcpt_log)
        self.rcpt_log = []

    # -- hooks called by aiosmtpd -------------------------------------------

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        return await self._helo(session, hostname, esmtp=False) or f"250 {self.app.config.hostname}"

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        refused = await self._helo(session, hostname, esmtp=True)
        if refused:
            return [refused]
        lines: list[str] = server.ehlo_lines()
        return lines

    async def _helo(self, aio_session: Any, hostname: str, *, esmtp: bool) -> str | None:
        if self.txn is not None:
            await self.end_transaction("aborted", "helo", "helo_reset", None)
        aio_session.host_name = hostname
        self.session.helo = hostname
        self.session.esmtp = esmtp
        outcome = await self.app.pipeline.run(Stage.HELO, self.session)
        if outcome.action in (Action.REJECT, Action.TEMPFAIL):
            aio_session.host_name = None
            return self._refuse(outcome)
        return None

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.app.draining:
            self.close_after_reply = True
            return SHUTTING_DOWN.render()
        if self.txn is not None:
            await self.end_transaction("aborted", "mail", "unfinished", None)
        sender = "" if address == "<>" else address
        if _CONTROL_CHARS.search(sender):
            return "553 5.1.7 Bad sender address syntax"
        txn = Transaction(new_id(), sender, tuple(options))
        limited = self.app.session_limits.on_transaction(
            self.session
        ) or self.app.session_limits.duration_exceeded(self.session, time.monotonic())
        if limited is not None and limited.reply is not None:
            self.close_after_reply = True
            return limited.reply.render()
        outcome = await self.app.pipeline.run(Stage.MAIL, self.session, txn)
        if outcome.action in (Action.REJECT, Action.TEMPFAIL):
            self._log_refused(txn, outcome.decided_by, outcome.reply or _default_reply(outcome.action))
            return self._refuse(outcome)
        txn.extras["mail_outcome"] = outcome
        needs = frozenset(
            n
            for n, present in (("8BITMIME", "BODY=8BITMIME" in options), ("SMTPUTF8", "SMTPUTF8" in options))
            if present
        )
        begun = await self.app.backend.begin(self._facts(), needs)
        if isinstance(begun, Reply):
            self._log_refused(txn, "backend", begun)
            return begun.render()
        reply = await begun.mail(sender, list(options))
        if not reply.is_positive:
            await begun.finish()
            self._log_refused(txn, "backend", reply)
            return reply.render()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.txn, self.btx = txn, begun
        self.session.transactions += 1
        return reply.render()

    def _log_refused(self, txn: Transaction, reason: str, reply: Reply) -> None:
        """A transaction that ended at MAIL: the same action words as every other stage."""
        action = "tempfailed" if reply.is_transient else "rejected"
        self.app.metrics.messages.labels(action, "mail", reason).inc()
        self.app.logs.transaction(self.session, txn, action, "mail", reason, reply, [])

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        txn, btx = self.txn, self.btx
        if txn is None or btx is None:
            return "503 5.5.1 Error: need MAIL command"
        if _CONTROL_CHARS.search(address):
            return "553 5.1.3 Bad recipient address syntax"
        rcpt = Recipient(address, tuple(options))
        limited = self.app.session_limits.duration_exceeded(self.session, time.monotonic())
        if limited is not None and limited.reply is not None:
            self.close_after_reply = True
            return limited.reply.render()
        outcome = await self.app.pipeline.run(Stage.RCPT, self.session, txn, rcpt)
        if outcome.action in (Action.REJECT, Action.TEMPFAIL):
            reply = outcome.reply or _default_reply(outcome.action)
            return await self._count_rcpt(address, reply) or self._refuse(outcome)
        reply = await btx.rcpt(address, list(options))
        closing = await self._count_rcpt(address, reply)
        if closing is not None:
            return closing
        if reply.is_positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
            txn.recipients.append(rcpt)
            if outcome.action is not Action.CONTINUE:
                txn.extras.setdefault("rcpt_outcomes", []).append(outcome)
        elif btx.broken:
            # The backend went away: this transaction cannot complete.
            await self.end_transaction("tempfailed", "rcpt", "backend", reply)
            envelope.mail_from = None
            envelope.rcpt_tos.clear()
        return reply.render()

    async def _count_rcpt(self, address: str, reply: Reply) -> str | None:
        """Count the recipient's outcome; a 421 reply when rejected recipients pass the session limit."""
        outcome = "accepted" if reply.is_positive else "tempfailed" if reply.is_transient else "rejected"
        self.app.metrics.recipients.labels(outcome).inc()
        self.rcpt_log.append((address, f"{reply.code} {reply.enhanced}".strip()))
        if outcome != "rejected":
            return None
        return await self.count_error("rejected_rcpt")

    async def count_error(self, kind: str) -> str | None:
        """Count an error against the session limits and tarpit; the 421 reply when a limit is passed."""
        limits = self.app.session_limits
        verdict = limits.on_command_error(self.session, kind)
        delay = limits.tarpit_delay(self.session)
        if delay > 0:
            await asyncio.sleep(delay)
        if verdict is not None and verdict.reply is not None:
            self.close_after_reply = True
            return verdict.reply.render()
        return None

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        if self.txn is not None:
            await self.end_transaction("aborted", "rset", "client_rset", None)
        return OK.render()

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        if self.txn is not None:
            await self.end_transaction("aborted", "quit", "client_quit", None)
        return "221 2.0.0 Bye"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        txn, btx = self.txn, self.btx
        if txn is None or btx is None:
            return "503 5.5.1 Error: need MAIL command"
        started = time.perf_counter()
        txn.message = bytes(envelope.original_content)
        # The transaction holds the message from here on: not the envelope too.
        envelope.content = envelope.original_content = None
        self.session.messages += 1
        self.app.metrics.message_size.observe(len(txn.message))
        try:
            reply = await self._deliver(txn, btx)
        finally:
            self.app.metrics.data_duration.observe(time.perf_counter() - started)
        if self.app.draining:
            self.close_after_reply = True
        return reply.render()

    async def _deliver(self, txn: Transaction, btx: BackendTransaction) -> Reply:
        outcome = await self.app.pipeline.run(Stage.DATA, self.session, txn)
        drop_content_facts(txn)
        final = self._combine(txn, outcome)
        action = final.action
        if action in (Action.REJECT, Action.TEMPFAIL):
            reply = final.reply or _default_reply(action)
            word = "rejected" if action is Action.REJECT else "tempfailed"
            await self.end_transaction(word, "data", final.decided_by or action.word, reply)
            if final.disconnect:
                self.close_after_reply = True
            return reply
        if action is Action.DISCARD:
            reply = Reply(250, "2.0.0", f"Ok: {txn.id} discarded")
            await self.end_transaction("discarded", "data", final.decided_by or "discard", reply)
            return reply
        message = self._final_message(txn, final)
        # What goes to the backend replaces what came in, so one copy is held
        # while the backend reads it (no check looks at the content any more).
        txn.message = message
        if action is Action.QUARANTINE and final.quarantine_to:
            reply = await self.app.quarantine(final.quarantine_to, self.session, txn, message)
            await self.end_transaction(
                "quarantined" if reply.is_positive else "tempfailed",
                "data",
                final.decided_by or "quarantine",
                reply,
            )
            return reply
        # Shielded: a client vanishing now must not cut the backend off
        # mid-DATA; we still want its reply in the log (and its queue id).
        self.data_task = asyncio.ensure_future(btx.data(message))
        reply = await asyncio.shield(self.data_task)
        self.data_task = None
        if reply.is_positive:
            # As Postfix does: junk commands are counted again from a delivery on.
            self.session.junk_commands = 0
            word = "quarantined" if action is Action.QUARANTINE else "delivered"
            reason = final.decided_by or ("quarantine" if action is Action.QUARANTINE else "clean")
            await self.end_transaction(word, "data", reason, reply)
        else:
            word = "tempfailed" if reply.is_transient else "rejected"
            await self.end_transaction(word, "data", "backend", reply)
        return reply

    def _combine(self, txn: Transaction, data: StageOutcome) -> StageOutcome:
        """The most severe of the DATA outcome and what MAIL/RCPT decided for later."""
        final = data
        earlier: list[StageOutcome] = [txn.extras.get("mail_outcome") or StageOutcome()]
        earlier += txn.extras.get("rcpt_outcomes", [])
        for outcome in earlier:
            if outcome.action > final.action and outcome.action is not Action.ACCEPT:
                outcome.header_edits.extend(final.header_edits)
                final = outcome
            elif outcome is not final:
                final.header_edits[:0] = outcome.header_edits
        return final

    def _final_message(self, txn: Transaction, outcome: StageOutcome) -> bytes:
        trace = received_header(self.session, txn, self.app.config.hostname)
        # Incoming Authentication-Results claiming our authserv-id are forgeries.
        return apply_edits(txn.message, outcome.header_edits, prepend=trace, drop=self.app.forged_ar)

    async def connection_lost(self) -> None:
        """The client is gone, however it went: release everything it held."""
        if self.data_task is not None and self.txn is not None:
            # The client left while the backend had the message: SMTP cannot tell
            # the client any more, so log what the backend said (its queue id).
            reply = await self.data_task
            word = "delivered" if reply.is_positive else "tempfailed" if reply.is_transient else "rejected"
            await self.end_transaction(word, "data", "client_lost_before_reply", reply)
        if self.txn is not None:
            await self.end_transaction("aborted", "disconnect", "client_lost", None)
        try:
            await self.app.pipeline.run(Stage.DISCONNECT, self.session)
        except Exception:
            log.exception("disconnect checks failed (session %s)", self.session.id)


__all__ = ["INTERNAL_ERROR", "ConnectionHandler"]
