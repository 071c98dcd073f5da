"""The submission policy (RFC 6409): AUTH, who may send as whom, and what outbound mail gets.

Decisions only, like :mod:`smtpproxy.policy.core`; the drivers carry them out.

======================================= =========================================================
situation                               reply
======================================= =========================================================
AUTH before TLS                         ``538 5.7.11 Encryption required ...`` (RFC 4954 §6)
AUTH when authenticated already         ``503 5.5.1``
unknown mechanism                       ``504 5.5.4``
malformed SASL data                     ``501 5.5.2`` (counted as a failure)
wrong user or password                  ``535 5.7.8`` after the tarpit delay; the same words
                                        whether the user exists or not
too many failures (address or user)     ``421 4.7.0`` and close, before any password is tried
success                                 ``235 2.7.0`` (``auth: backend``: the backend's reply)
MAIL without AUTH                       ``530 5.7.0 Authentication required``
MAIL FROM or header From not the user's ``553 5.7.1`` (Postfix's reject_sender_login_mismatch)
======================================= =========================================================

Outbound mail runs its own pipeline (rate limits, relay, limits, rules: no SPF,
DKIM or DMARC verdicts of ours, so no Authentication-Results of ours), says
ESMTPSA in Received, and is DKIM-signed for the header From's domain when
there are keys for it and the user may send as that address.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from email.utils import getaddresses

from smtpproxy.config.submission import SubmissionConfig
from smtpproxy.headers import header_values, sanitize
from smtpproxy.metrics import Metrics
from smtpproxy.pipeline import Pipeline
from smtpproxy.session import Session
from smtpproxy.submission.bruteforce import AuthGuard
from smtpproxy.submission.dkimsign import DkimSigner
from smtpproxy.submission.passwd import PasswdFile
from smtpproxy.submission.sasl import MECHANISMS, Credentials
from smtpproxy.submission.senderlogin import SenderLogin
from smtpproxy.verdict import Reply

log = logging.getLogger("smtpproxy.submission")

ENCRYPTION_REQUIRED = Reply(538, "5.7.11", "Encryption required for requested authentication mechanism")
ALREADY_AUTHENTICATED = Reply(503, "5.5.1", "Already authenticated")
UNKNOWN_MECHANISM = Reply(504, "5.5.4", "Unrecognized authentication type")
MALFORMED = Reply(501, "5.5.2", "Cannot decode the authentication data")
INVALID = Reply(535, "5.7.8", "Authentication credentials invalid")
SUCCESS = Reply(235, "2.7.0", "Authentication successful")
TOO_MANY_FAILURES = Reply(421, "4.7.0", "Too many failed authentications, closing")
AUTH_REQUIRED = Reply(530, "5.7.0", "Authentication required")


def sender_mismatch(address: str, user: str) -> Reply:
    """553 5.7.1 naming the address, as Postfix's reject_sender_login_mismatch does."""
    return Reply(
        553,
        "5.7.1",
        f"<{sanitize(address, limit=200)}>: Sender address rejected: not owned by user "
        f"{sanitize(user, limit=100)}",
    )


def header_from(message: bytes) -> list[str]:
    """The addresses of the header From field(s), as written (lower-casing is the caller's)."""
    return [addr for _, addr in getaddresses(header_values(message, "from")) if addr]


@dataclass(frozen=True, slots=True)
class AuthOutcome:
    """What to answer to one AUTH step: ``reply`` (None: mirror the backend's), a delay, a close."""

    reply: Reply | None
    delay: float = 0.0
    disconnect: bool = False


class Submission:
    """What every submission session of one application shares."""

    def __init__(
        self,
        config: SubmissionConfig,
        pipeline: Pipeline,
        guard: AuthGuard,
        metrics: Metrics,
        *,
        passwd: PasswdFile | None = None,
        sender_login: SenderLogin | None = None,
        signer: DkimSigner | None = None,
    ) -> None:
        self.config = config
        self.pipeline = pipeline
        self.guard = guard
        self.metrics = metrics
        self.passwd = passwd
        self.sender_login = sender_login
        self.signer = signer

    @property
    def local(self) -> bool:
        """True when AUTH is verified here (passwd_file); False: relayed to the backend."""
        return self.passwd is not None

    @staticmethod
    def offers_auth(session: Session) -> bool:
        """AUTH is advertised only over TLS (STARTTLS done, or the implicit-TLS port)."""
        return session.tls is not None

    # -- AUTH ----------------------------------------------------------------------

    async def auth_start(self, session: Session, mechanism: str) -> AuthOutcome | None:
        """AUTH MECHANISM was asked: a refusal, or None to go on with the exchange."""
        if session.auth_user is not None:
            return AuthOutcome(ALREADY_AUTHENTICATED)
        if session.tls is None:
            self.metrics.auth_attempts.labels("no_tls").inc()
            return AuthOutcome(ENCRYPTION_REQUIRED)
        if mechanism.upper() not in MECHANISMS:
            return AuthOutcome(UNKNOWN_MECHANISM)
        if await self.guard.blocked(session.client_address):
            return self._blocked(session)
        return None

    async def auth_local(self, session: Session, mechanism: str, creds: Credentials) -> AuthOutcome:
        """``passwd_file``: verify ``creds`` here."""
        assert self.passwd is not None, "auth_local needs a passwd_file"
        if await self.guard.blocked(session.client_address, creds.user):
            return self._blocked(session)
        if await self.passwd.verify_async(creds.user, creds.password):
            self._authenticated(session, mechanism, creds.user)
            return AuthOutcome(SUCCESS)
        return await self._failed(session, creds.user, INVALID)

    async def auth_user_known(self, session: Session, user: str) -> AuthOutcome | None:
        """``auth: backend``, the user name decoded: refuse a blocked user before the backend is asked."""
        if await self.guard.blocked(session.client_address, user):
            return self._blocked(session)
        return None

    async def auth_answered(self, session: Session, mechanism: str, user: str, reply: Reply) -> AuthOutcome:
        """``auth: backend``: the backend's final reply to the relayed exchange (mirrored unless a limit is hit)."""
        if reply.code == 235:
            self._authenticated(session, mechanism, user)
            return AuthOutcome(None)
        if reply.is_transient:
            self.metrics.auth_attempts.labels("backend_error").inc()
            return AuthOutcome(None)
        outcome = await self._failed(session, user, reply)
        return AuthOutcome(None, delay=outcome.delay) if not outcome.disconnect else outcome

    async def auth_malformed(self, session: Session, user: str | None = None) -> AuthOutcome:
        """The client's SASL data could not be decoded (or it cancelled with ``*``): 501, counted."""
        self.metrics.auth_attempts.labels("malformed").inc()
        over = await self.guard.failed(session.client_address, user)
        if over:
            return self._blocked(session, count=False)
        return AuthOutcome(MALFORMED, delay=self.guard.tarpit)

    async def _failed(self, session: Session, user: str, reply: Reply) -> AuthOutcome:
        self.metrics.auth_attempts.labels("failure").inc()
        # The user name is the client's claim, unverified: logged only sanitised, never the password.
        log.info(
            "auth failed",
            extra={
                "fields": {
                    "session": session.id,
                    "client_ip": session.client_address,
                    "user": sanitize(user, limit=100),
                    "direction": "outbound",
                }
            },
        )
        if await self.guard.failed(session.client_address, user):
            return self._blocked(session, count=False)
        return AuthOutcome(reply, delay=self.guard.tarpit)

    def _blocked(self, session: Session, *, count: bool = True) -> AuthOutcome:
        if count:
            self.metrics.auth_attempts.labels("blocked").inc()
        return AuthOutcome(TOO_MANY_FAILURES, delay=self.guard.tarpit, disconnect=True)

    def _authenticated(self, session: Session, mechanism: str, user: str) -> None:
        session.auth_user, session.auth_mechanism = user, mechanism.upper()
        self.metrics.auth_attempts.labels("success").inc()
        log.info(
            "authenticated",
            extra={
                "fields": {
                    "session": session.id,
                    "client_ip": session.client_address,
                    "user": sanitize(user, limit=100),
                    "mechanism": mechanism.upper(),
                    "direction": "outbound",
                }
            },
        )

    # -- envelope and content ----------------------------------------------------------

    def mail(self, session: Session, sender: str) -> Reply | None:
        """MAIL FROM on the submission port: 530 without AUTH, 553 for another's address."""
        user = session.auth_user
        if user is None:
            return AUTH_REQUIRED
        if self.sender_login is not None and not self.sender_login.permits(user, sender):
            return sender_mismatch(sender, user)
        return None

    def content(self, session: Session, message: bytes) -> Reply | None:
        """End of DATA: 553 when sender_login is set and the header From is not the user's."""
        user = session.auth_user
        if user is None or self.sender_login is None:
            return None
        addresses = header_from(message)
        if not addresses:
            return sender_mismatch("", user)
        for address in addresses:
            if not self.sender_login.permits(user, address):
                return sender_mismatch(address, user)
        return None

    async def sign(self, session: Session, message: bytes) -> bytes:
        """``message`` DKIM-signed for its header From domain, when the user may send as that address."""
        if self.signer is None or session.auth_user is None:
            return message
        addresses = header_from(message)
        if len(addresses) != 1:
            return message  # no single author domain to sign for (RFC 6376 §5.1)
        domain = addresses[0].rpartition("@")[2].lower().rstrip(".")
        keys = self.signer.keys(domain)
        if not keys:
            return message
        if self.sender_login is not None and not self.sender_login.permits(session.auth_user, addresses[0]):
            return message
        signed = await self.signer.sign_async(message, domain)
        for key in keys:
            self.metrics.dkim_signed.labels(key.algorithm.decode()).inc()
        return signed

    def reload(self) -> None:
        """SIGHUP: the passwd file, the sender_login table and the signing keys."""
        for part in (self.passwd, self.sender_login, self.signer):
            if part is not None:
                part.reload()
