"""One whole message to a backend in one call: the relay sequence written once.

Used where the proxy delivers a message it holds itself rather than mirroring
a client's commands: quarantine destinations and ``smtpproxy quarantine
release``. Every recipient must be accepted, or nothing is sent: a message is
never half-delivered.
"""

from __future__ import annotations

from collections.abc import Sequence

from smtpproxy.backend import Backend, ClientFacts
from smtpproxy.verdict import Reply


async def relay_message(
    backend: Backend,
    client: ClientFacts,
    sender: str,
    recipients: Sequence[str],
    message: bytes,
    needs: frozenset[str] = frozenset(),
) -> Reply:
    """MAIL, every RCPT, DATA: the backend's first refusal, or its reply to the content."""
    begun = await backend.begin(client, needs)
    if isinstance(begun, Reply):
        return begun
    try:
        reply = await begun.mail(sender, [])
        for rcpt in recipients if reply.is_positive else ():
            reply = await begun.rcpt(rcpt, [])
            if not reply.is_positive:
                return reply
        if reply.is_positive:
            reply = await begun.data(message)
        return reply
    finally:
        await begun.finish()
