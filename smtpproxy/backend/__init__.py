"""Outbound delivery: the interface every backend implements.

A backend transaction mirrors one client transaction. Its methods return the
backend's own ``Reply``; failures of the transport (refused, timed out,
dropped, garbage) become a 4xx ``Reply`` and mark the transaction ``broken``,
so the client keeps the message and retries. Nothing here raises for a
backend's misbehaviour.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from smtpproxy.verdict import Reply

# The replies for transport failures (RFC 3463): 4.4.1 no answer from host,
# 4.4.2 bad connection, 4.3.0 other or undefined mail system status.
UNREACHABLE = Reply(451, "4.4.1", "Backend mail server unreachable, please try again later")
DROPPED = Reply(451, "4.4.2", "Connection to the backend mail server lost, please try again later")
TIMED_OUT = Reply(451, "4.4.2", "Backend mail server timed out, please try again later")
TLS_FAILED = Reply(451, "4.3.0", "TLS to the backend mail server failed, please try again later")
GARBLED = Reply(451, "4.3.0", "Backend mail server protocol error, please try again later")
BUSY = Reply(451, "4.3.0", "Backend mail server busy, please try again later")
# Refused rather than sent under the proxy's own identity or in plaintext
# (DESIGN.md: the backend believes the right client; backend TLS cannot be stripped).
IDENTITY_REFUSED = Reply(
    451, "4.3.0", "Backend mail server does not accept the client's identity, please try again later"
)
TLS_REQUIRED = Reply(451, "4.3.0", "Backend mail server does not offer TLS, please try again later")


@dataclass(frozen=True, slots=True)
class ClientFacts:
    """What the backend may be told about the original client (XCLIENT/XFORWARD)."""

    ip: str
    helo: str | None
    rdns: str | None
    esmtp: bool


class BackendTransaction(Protocol):
    """One envelope relayed to the backend."""

    broken: bool

    async def mail(self, sender: str, params: list[str]) -> Reply:
        """Relay MAIL FROM; ``sender`` is '' for the null sender."""
        ...

    async def rcpt(self, recipient: str, params: list[str]) -> Reply:
        """Relay one RCPT TO."""
        ...

    async def data(self, message: bytes) -> Reply:
        """Send the content; the returned reply is the client's final answer."""
        ...

    def unsupported(self, needs: frozenset[str], command: str) -> Reply | None:
        """The refusal when this transaction's connection lacks an extension in ``needs`` (at RCPT)."""
        ...

    async def finish(self) -> None:
        """End the transaction (RSET if unfinished) and give the connection back."""
        ...


class Backend(Protocol):
    """Where clean mail goes."""

    async def begin(self, client: ClientFacts, needs: frozenset[str]) -> BackendTransaction | Reply:
        """A transaction ready for MAIL, or the 4xx reply to give the client.

        ``needs`` names extensions the message requires (8BITMIME, SMTPUTF8, DSN).
        """
        ...

    def offers(self, extension: str) -> bool:
        """Whether the backend offers ``extension`` (DSN), as far as it is known before a transaction.

        The EHLO we answer is written before any backend connection is taken, so
        this is the backend's last EHLO; each transaction checks its own
        connection again (``begin``, ``unsupported``).
        """
        ...

    async def probe(self) -> str | None:
        """None when the backend is reachable now; otherwise why not."""
        ...

    async def sweep(self) -> None:
        """Housekeeping: close idle connections past their time."""
        ...

    async def close(self) -> None:
        """Close everything."""
        ...
