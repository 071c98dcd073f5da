"""The backend of a milter-only instance (``listen: null``): none, since the MTA keeps the mail."""

from __future__ import annotations

from smtpproxy.backend import BackendTransaction, ClientFacts
from smtpproxy.replies import INTERNAL_ERROR
from smtpproxy.verdict import Reply


class NoBackend:
    """Satisfies :class:`smtpproxy.backend.Backend`; nothing ever asks it for a transaction."""

    async def begin(self, client: ClientFacts, needs: frozenset[str]) -> BackendTransaction | Reply:
        """Never called without an SMTP listener; a 451 if it were."""
        return INTERNAL_ERROR

    def offers(self, extension: str) -> bool:
        """Offers nothing: there is no backend connection."""
        return False

    async def probe(self) -> str | None:
        """Always ready: there is nothing to reach."""
        return None

    async def sweep(self) -> None:
        """Nothing to sweep."""

    async def close(self) -> None:
        """Nothing to close."""
