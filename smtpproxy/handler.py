"""One client connection's SMTP dialogue: the aiosmtpd driver of the policy core.

aiosmtpd calls the ``handle_*`` hooks; each asks the connection's
:class:`~smtpproxy.policy.SessionPolicy` what to do and carries it out: a reply
of its own, or the command relayed to the backend transaction and the backend's
reply returned (DESIGN.md: mirror the backend per transaction; never answer
250 to DATA before the backend did). Nothing here decides.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from aiosmtpd.smtp import MISSING

from smtpproxy import replies
from smtpproxy.backend import BackendTransaction, ClientFacts
from smtpproxy.policy import Decision, Delivery, SessionPolicy
from smtpproxy.policy.submission import AuthOutcome
from smtpproxy.replies import INTERNAL_ERROR, OK, SHUTTING_DOWN
from smtpproxy.session import Session
from smtpproxy.submission.sasl import Credentials, SaslError, decode_base64, login_field, plain
from smtpproxy.verdict import Reply

if TYPE_CHECKING:
    from smtpproxy.context import ConnectionContext

# ``auth: backend`` is refused at start (submission.build); should a Submission without a
# passwd file reach here all the same, AUTH fails temporarily rather than open.
BACKEND_AUTH_UNAVAILABLE = Reply(454, "4.7.0", "Temporary authentication failure")


async def _credentials(server: Any, mechanism: str, initial: str | None) -> Credentials | None:
    """The user and password of a PLAIN or LOGIN exchange; None when the client cancelled.

    aiosmtpd's public ``challenge_auth`` sends the 334 challenges (and answers
    a cancel or bad base64 itself); it never logs what the client sends.
    """
    if mechanism == "PLAIN":
        if initial is not None:
            return plain(decode_base64(initial))
        response = await server.challenge_auth("")
        return None if response is MISSING else plain(response)
    if initial is not None:
        user = login_field(decode_base64(initial))
    else:
        response = await server.challenge_auth("Username:")
        if response is MISSING:
            return None
        user = login_field(response)
    password = await server.challenge_auth("Password:")
    if password is MISSING:
        return None
    return Credentials(user, login_field(password))


log = logging.getLogger("smtpproxy.handler")


class ConnectionHandler:
    """The aiosmtpd handler of one connection; owns its policy and the open backend transaction."""

    def __init__(self, app: ConnectionContext, session: Session) -> None:
        self.app = app
        self.session = session
        self.policy: SessionPolicy = app.policy.session(session)
        self.btx: BackendTransaction | None = None
        self.close_after_reply = False
        self.busy = False  # a command is being processed: the idle timer must not fire
        self.data_task: asyncio.Future[Reply] | None = None  # content on its way to the backend
        self._delivery: Delivery | None = None
        self.mail_auth: str | None = None  # the AUTH= parameter of the last MAIL (submission)

    @property
    def txn(self) -> Any:
        """The open transaction (the policy's), None between transactions."""
        return self.policy.txn

    # -- helpers ------------------------------------------------------------

    def _facts(self) -> ClientFacts:
        s = self.session
        return ClientFacts(ip=s.client_address, helo=s.helo, rdns=s.rdns, esmtp=s.esmtp)

    async def _answer(self, decision: Decision, default: Reply | None = None) -> str:
        """Carry out a decision that answers the client itself (or ``default``, the backend's reply)."""
        if decision.delay > 0:
            await asyncio.sleep(decision.delay)
        if decision.disconnect:
            self.close_after_reply = True
        reply = decision.reply or default
        assert reply is not None
        return reply.render()

    async def _release_backend(self) -> None:
        btx, self.btx = self.btx, None
        if btx is not None:
            try:
                await btx.finish()
            except Exception:
                log.exception("releasing backend transaction failed")

    async def end_transaction(self, word: str, stage: str, reason: str, reply: Reply | None) -> None:
        """Close the backend side and end the policy's transaction (logged, counted). Safe to call twice."""
        await self._release_backend()
        self.policy.end(word, stage, reason, reply)

    # -- AUTH (submission) ----------------------------------------------------

    async def handle_AUTH(self, server: Any, args: list[str]) -> str | None:
        """AUTH PLAIN/LOGIN: collect the credentials, let the submission policy decide.

        None: aiosmtpd's ``challenge_auth`` has answered already (the client
        cancelled with ``*`` or sent bad base64); the attempt is still counted.
        """
        sub = self.policy.submission
        if sub is None:
            return "502 5.5.1 AUTH not supported"
        mechanism = args[0].upper()
        outcome = await sub.auth_start(self.session, mechanism)
        if outcome is None:
            try:
                creds = await _credentials(server, mechanism, args[1] if len(args) > 1 else None)
            except SaslError:
                return await self._auth_answer(await sub.auth_malformed(self.session))
            if creds is None:
                outcome = await sub.auth_malformed(self.session)
                if outcome.disconnect:
                    return await self._auth_answer(outcome)
                return None
            if sub.local:
                outcome = await sub.auth_local(self.session, mechanism, creds)
            else:
                outcome = AuthOutcome(BACKEND_AUTH_UNAVAILABLE)
        return await self._auth_answer(outcome)

    async def _auth_answer(self, outcome: AuthOutcome) -> str:
        if outcome.delay > 0:
            await asyncio.sleep(outcome.delay)  # the tarpit: guesses cost the guesser time
        if outcome.disconnect:
            self.close_after_reply = True
        assert outcome.reply is not None
        return outcome.reply.render()

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
        self.session.dsn_offered = any(line[4:] == "DSN" for line in lines)
        return lines

    async def _helo(self, aio_session: Any, hostname: str, *, esmtp: bool) -> str | None:
        if self.txn is not None:
            await self.end_transaction("aborted", "helo", "helo_reset", None)
        aio_session.host_name = hostname
        self.session.dsn_offered = False
        decision = await self.policy.helo(hostname, esmtp=esmtp)
        if decision.forward:
            return None
        aio_session.host_name = None
        return await self._answer(decision)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        if self.app.draining:
            self.close_after_reply = True
            return SHUTTING_DOWN.render()
        if self.txn is not None:
            await self.end_transaction("aborted", "mail", "unfinished", None)
        sender = "" if address == "<>" else address
        decision = await self.policy.mail(sender, tuple(options))
        if not decision.forward:
            return await self._answer(decision)
        begun = await self.app.backend.begin(self._facts(), decision.needs)
        if isinstance(begun, Reply):
            self.policy.mail_answered(begun)
            return begun.render()
        reply = await begun.mail(sender, list(options))
        self.policy.mail_answered(reply)
        if not reply.is_positive:
            await begun.finish()
            return reply.render()
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        self.btx = begun
        return reply.render()

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        btx = self.btx
        if btx is None:
            return replies.NEED_MAIL.render()
        decision = await self.policy.rcpt(address, tuple(options))
        if not decision.forward:
            return await self._answer(decision)
        refused = btx.unsupported(decision.needs, "RCPT TO") if decision.needs else None
        reply = refused or await btx.rcpt(address, list(options))
        answered = self.policy.rcpt_answered(address, tuple(options), reply)
        if not answered.forward:
            return await self._answer(answered)
        if reply.is_positive:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(options)
        elif btx.broken:
            # The backend went away: this transaction cannot complete.
            await self.end_transaction("tempfailed", "rcpt", "backend", reply)
            envelope.mail_from = None
            envelope.rcpt_tos.clear()
        return await self._answer(answered, reply)

    async def count_error(self, kind: str) -> str | None:
        """Count an error against the session limits and tarpit; the 421 reply when a limit is passed."""
        decision = self.policy.command_error(kind)
        if decision.delay > 0:
            await asyncio.sleep(decision.delay)
        if decision.reply is not None:
            self.close_after_reply = True
            return decision.reply.render()
        return None

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        if self.txn is not None:
            await self.end_transaction("aborted", "rset", "client_rset", None)
        return OK.render()

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        if self.txn is not None:
            await self.end_transaction("aborted", "quit", "client_quit", None)
        return replies.BYE.render()

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        btx = self.btx
        if self.txn is None or btx is None:
            return replies.NEED_MAIL.render()
        started = time.perf_counter()
        try:
            reply = await self._deliver(_take_content(envelope), btx)
        finally:
            self.app.metrics.data_duration.observe(time.perf_counter() - started)
        if self.app.draining:
            self.close_after_reply = True
        return reply.render()

    async def _deliver(self, message: bytes, btx: BackendTransaction) -> Reply:
        delivery = await self.policy.data(message)
        # What goes out replaced what came in (on the transaction too): holding
        # the received copy here while the backend reads would double the memory.
        del message
        if delivery.message is None:
            assert delivery.reply is not None
            await self._release_backend()
            self.policy.refused(delivery)
            if delivery.disconnect:
                self.close_after_reply = True
            return delivery.reply
        if delivery.destination is not None:
            reply = await self.app.quarantine(delivery.destination, self.session, self.txn, delivery.message)
            await self._release_backend()
            self.policy.delivered(delivery, reply)
            return reply
        # Shielded: a client vanishing now must not cut the backend off
        # mid-DATA; we still want its reply in the log (and its queue id).
        self._delivery = delivery
        self.data_task = asyncio.ensure_future(btx.data(delivery.message))
        reply = await asyncio.shield(self.data_task)
        self.data_task, self._delivery = None, None
        await self._release_backend()
        self.policy.delivered(delivery, reply)
        return reply

    async def connection_lost(self) -> None:
        """The client is gone, however it went: release everything it held."""
        if self.data_task is not None and self.txn is not None and self._delivery is not None:
            # The client left while the backend had the message: SMTP cannot tell
            # the client any more, so log what the backend said (its queue id).
            reply = await self.data_task
            await self._release_backend()
            self.policy.delivered(self._delivery, reply, client_gone=True)
        if self.txn is not None:
            await self.end_transaction("aborted", "disconnect", "client_lost", None)
        try:
            await self.policy.disconnect()
        except Exception:
            log.exception("disconnect checks failed (session %s)", self.session.id)


def _take_content(envelope: Any) -> bytes:
    """The received message, taken from aiosmtpd's envelope (which keeps no reference to it)."""
    message = bytes(envelope.original_content)
    envelope.content = envelope.original_content = None
    return message


__all__ = ["INTERNAL_ERROR", "ConnectionHandler"]
