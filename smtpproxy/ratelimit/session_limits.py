"""Per-connection limits (``session_limits:``): a pure policy object the server consults.

Postfix's smtpd error limits and anvil, in one place. Every limit is "at most
N": the command that goes past it gets the reply below and the connection is
closed (``Verdict.disconnect``), counted in
``smtpproxy_session_limit_hits{limit}``.

======================== ===================================================== ==========
limit                    counts                                                reply
======================== ===================================================== ==========
max_transactions         MAIL commands accepted (``session.transactions``)      421 4.7.0
max_invalid_commands     unknown/malformed commands (kinds invalid_command,     421 4.7.0
                         syntax)
max_rejected_recipients  RCPTs refused (kind rejected_rcpt): dictionary attacks 421 4.7.0
max_errors               every error reported, whatever its kind                421 4.7.0
max_duration             seconds since the connection opened                   421 4.4.2
max_junk_commands        NOOP, RSET, VRFY, EXPN, HELP, repeated HELO/EHLO      421 4.7.0
                         (``session.junk_commands``; reset by a delivery)
======================== ===================================================== ==========

Tarpit: after errors, the server waits ``tarpit_delay * errors`` seconds
(capped at ``tarpit_max``) before answering, which slows dictionary attacks and
broken clients without bothering well-behaved ones (0, the default, is off).
"""

from __future__ import annotations

from smtpproxy.config import SessionLimitsConfig
from smtpproxy.metrics import Metrics
from smtpproxy.session import Session
from smtpproxy.verdict import Action, Reply, Verdict

ERROR_KINDS = ("invalid_command", "syntax", "rejected_rcpt", "error")


def _closing(limit: str, enhanced: str, text: str) -> Verdict:
    return Verdict(Action.TEMPFAIL, Reply(421, enhanced, text), reasons=(limit,), disconnect=True)


class SessionLimits:
    """Decides when a connection has gone past its per-connection limits."""

    def __init__(self, config: SessionLimitsConfig, metrics: Metrics) -> None:
        self.config = config
        self.metrics = metrics

    def _hit(self, limit: str, enhanced: str, text: str) -> Verdict:
        self.metrics.session_limit_hits.labels(limit=limit).inc()
        return _closing(limit, enhanced, text)

    def on_command_error(self, session: Session, kind: str) -> Verdict | None:
        """Count an error of ``kind`` on the session; a 421 closing verdict when a limit is passed.

        ``kind``: invalid_command or syntax (counts invalid commands), rejected_rcpt
        (counts rejected recipients), error (anything else). Every kind also
        counts toward ``max_errors``. The caller must not count these itself.
        """
        if kind not in ERROR_KINDS:
            raise ValueError(f"error kind must be one of {', '.join(ERROR_KINDS)}, got {kind!r}")
        c = self.config
        session.errors += 1
        if kind in ("invalid_command", "syntax"):
            session.invalid_commands += 1
            if c.max_invalid_commands is not None and session.invalid_commands > c.max_invalid_commands:
                return self._hit("max_invalid_commands", "4.7.0", "Too many invalid commands, closing")
        elif kind == "rejected_rcpt":
            session.rejected_recipients += 1
            if (
                c.max_rejected_recipients is not None
                and session.rejected_recipients > c.max_rejected_recipients
            ):
                return self._hit("max_rejected_recipients", "4.7.0", "Too many rejected recipients, closing")
        if c.max_errors is not None and session.errors > c.max_errors:
            return self._hit("max_errors", "4.7.0", "Too many errors, closing")
        return None

    def on_transaction(self, session: Session) -> Verdict | None:
        """At MAIL, before accepting it: 421 when ``max_transactions`` were already accepted.

        Reads ``session.transactions`` (the server counts accepted MAIL commands).
        """
        limit = self.config.max_transactions
        if limit is not None and session.transactions >= limit:
            return self._hit("max_transactions", "4.7.0", "Too many transactions, closing")
        return None

    def on_junk_command(self, session: Session) -> Verdict | None:
        """Count a command that moves no mail on; 421 when ``max_junk_commands`` are passed.

        Postfix's ``smtpd_junk_command_limit``: without it a client can keep a
        slot (and our CPU) busy forever with NOOPs. The server resets
        ``session.junk_commands`` when a message is delivered.
        """
        session.junk_commands += 1
        limit = self.config.max_junk_commands
        if limit is not None and session.junk_commands > limit:
            return self._hit("max_junk_commands", "4.7.0", "Too many junk commands, closing")
        return None

    def duration_exceeded(self, session: Session, now: float) -> Verdict | None:
        """421 4.4.2 when the connection is older than ``max_duration`` (``now``: monotonic)."""
        limit = self.config.max_duration
        if limit is not None and now - session.started > limit:
            return self._hit("max_duration", "4.4.2", "Connection time limit exceeded, closing")
        return None

    def tarpit_delay(self, session: Session) -> float:
        """Seconds to wait before the next reply: ``tarpit_delay`` per error so far, capped."""
        if self.config.tarpit_delay <= 0 or session.errors <= 0:
            return 0.0
        return min(self.config.tarpit_max, self.config.tarpit_delay * session.errors)
