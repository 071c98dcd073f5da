"""What one client connection may use of the application: a narrow interface instead of the App.

The inbound server and the handler of a connection see only this (``App``
provides it), so they cannot reach into the rest of the application, and
``app``, ``server`` and ``handler`` form no import circle.
"""

from __future__ import annotations

import ssl
from collections.abc import Coroutine
from typing import Any, Protocol

from smtpproxy.backend import Backend
from smtpproxy.config import Config
from smtpproxy.inflight import InflightBudget
from smtpproxy.logs import EventLog
from smtpproxy.metrics import Metrics
from smtpproxy.policy import Policy
from smtpproxy.session import IPAddress, Session, Transaction
from smtpproxy.verdict import Reply


class ConnectionContext(Protocol):
    """The services a connection uses; everything else of the App stays out of its reach."""

    config: Config
    metrics: Metrics
    logs: EventLog
    policy: Policy
    backend: Backend
    inflight: InflightBudget
    tls_context: ssl.SSLContext | None
    draining: bool

    def admit(self, conn: Any) -> bool:
        """Count a new connection in (False: refuse it)."""

    def release(self, conn: Any) -> None:
        """A connection ended."""

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background task the application keeps track of."""

    def start_rdns(self, session: Session) -> None:
        """Look up the client's verified reverse name in the background."""

    def proxy_timeout_for(self, ip: IPAddress) -> float | None:
        """The PROXY header timeout for a trusted balancer; None for everyone else."""

    async def quarantine(self, destination: str, session: Session, txn: Transaction, message: bytes) -> Reply:
        """Deliver a quarantined message to its destination."""
