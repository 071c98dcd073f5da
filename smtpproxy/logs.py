"""Structured logs: one line per transaction and per connection, JSON by default.

The ``action`` and ``reason`` words are the same as the labels of
``smtpproxy_messages_total``, so an operator can go from a graph to the lines.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from smtpproxy.session import Session, Transaction
from smtpproxy.verdict import Reply

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class JsonFormatter(logging.Formatter):
    """One JSON object per record; structured fields come from ``extra={"fields": {...}}``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            out.update(fields)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger msg key=value ...`` for people reading a terminal."""

    def format(self, record: logging.LogRecord) -> str:
        base = f"{self.formatTime(record)} {record.levelname.lower()} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            base += " " + " ".join(
                f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in fields.items()
            )
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def setup_logging(fmt: str, level: str, stream: Any = None) -> None:
    """Configure the root logger once, at start."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # aiosmtpd logs every command at INFO: far too chatty for an MX.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, _LEVELS[level]))


class EventLog:
    """The proxy's own structured events."""

    def __init__(self) -> None:
        self.txn_log = logging.getLogger("smtpproxy.transaction")
        self.conn_log = logging.getLogger("smtpproxy.connection")

    def connection_open(self, session: Session) -> None:
        """A client connected."""
        if self.conn_log.isEnabledFor(logging.INFO):
            self.conn_log.info(
                "connect",
                extra={"fields": {"session": session.id, "client_ip": session.client_address}},
            )

    def connection_closed(self, session: Session) -> None:
        """A client is gone."""
        if self.conn_log.isEnabledFor(logging.INFO):
            self.conn_log.info(
                "disconnect",
                extra={
                    "fields": {
                        "session": session.id,
                        "client_ip": session.client_address,
                        "helo": session.helo,
                        "tls": session.tls.version if session.tls else None,
                        "transactions": session.transactions,
                        "errors": session.errors,
                        "duration": round(time.monotonic() - session.started, 3),
                    }
                },
            )

    def transaction(
        self,
        session: Session,
        txn: Transaction,
        action: str,
        stage: str,
        reason: str,
        reply: Reply | None,
        rcpts: list[tuple[str, str]],
    ) -> None:
        """The one line per transaction."""
        if not self.txn_log.isEnabledFor(logging.INFO):
            return
        results: dict[str, Any] = {}
        for name, value in txn.results.items():
            if isinstance(value, list):
                results[name] = [r.result for r in value]
            else:
                results[name] = value.result
        fields: dict[str, Any] = {
            "session": session.id,
            "txn": txn.id,
            "client_ip": session.client_address,
            "helo": session.helo,
            "tls": session.tls.version if session.tls else None,
            "mail_from": txn.mail_from,
            "rcpts": [{"addr": a, "reply": r} for a, r in rcpts],
            "size": txn.size,
            "action": action,
            "stage": stage,
            "reason": reason,
            "reply": reply.render() if reply else None,
            "score": txn.score,
            "rules": txn.matched_rules,
            "results": results,
            "duration": round(time.monotonic() - txn.started, 4),
        }
        self.txn_log.info("transaction", extra={"fields": fields})
