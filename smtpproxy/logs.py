"""Structured logs: one line per transaction and per connection, JSON by default.

The ``action`` and ``reason`` words are the same as the labels of
``smtpproxy_messages_total``, so an operator can go from a graph to the lines.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any

from smtpproxy.session import Session, Transaction
from smtpproxy.verdict import Reply

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class LineFormatter(logging.Formatter):
    """A record is one line built by ``line()``, which EventLog's direct path calls too."""

    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", None)
        exc = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            fields if isinstance(fields, dict) else None,
            exc,
        )

    def line(
        self,
        created: float,
        level: str,
        name: str,
        msg: str,
        fields: dict[str, Any] | None,
        exc: str | None = None,
    ) -> str:
        """The line of one event."""
        raise NotImplementedError


class JsonFormatter(LineFormatter):
    """One JSON object per record; structured fields come from ``extra={"fields": {...}}``."""

    def line(
        self,
        created: float,
        level: str,
        name: str,
        msg: str,
        fields: dict[str, Any] | None,
        exc: str | None = None,
    ) -> str:
        """The JSON line of one event (records and EventLog's direct path share it)."""
        out: dict[str, Any] = {
            "ts": round(created, 3),
            "level": level,
            "logger": name,
            "pid": os.getpid(),
            "msg": msg,
        }
        if fields:
            out.update(fields)
        if exc:
            out["exc"] = exc
        return json.dumps(out, ensure_ascii=False, default=str)


class TextFormatter(LineFormatter):
    """``time level logger msg key=value ...`` for people reading a terminal."""

    def line(
        self,
        created: float,
        level: str,
        name: str,
        msg: str,
        fields: dict[str, Any] | None,
        exc: str | None = None,
    ) -> str:
        """The text line of one event."""
        when = (
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + f",{int(created * 1000) % 1000:03d}"
        )
        text = f"{when} {level} {name}: {msg}"
        if fields:
            text += " " + " ".join(
                f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in fields.items()
            )
        if exc:
            text += "\n" + exc
        return text


class BufferedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes lines in batches: one write per batch instead of a write and flush per line.

    Lines wait at most ``max_delay`` seconds (the App also flushes on a timer
    when traffic stops, and at exit); warnings and errors are written at once.
    """

    def __init__(self, stream: Any, max_lines: int = 256, max_delay: float = 0.5) -> None:
        super().__init__(stream)
        self.max_lines = max_lines
        self.max_delay = max_delay
        self.pending: list[str] = []
        self.last_flush = time.monotonic()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.add_line(line, urgent=record.levelno >= logging.WARNING)

    def add_line(self, line: str, *, urgent: bool = False) -> None:
        """Queue one formatted line; write the batch when it is due."""
        self.pending.append(line)
        if (
            urgent
            or len(self.pending) >= self.max_lines
            or time.monotonic() - self.last_flush >= self.max_delay
        ):
            self.flush()

    def flush(self) -> None:
        self.acquire()
        try:
            if self.pending:
                try:
                    self.stream.write("\n".join(self.pending) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):
                    pass  # a closed or full log stream must never break a session
                self.pending.clear()
            self.last_flush = time.monotonic()
        finally:
            self.release()


def flush_logs() -> None:
    """Write out buffered log lines (called on a timer and at shutdown)."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def setup_logging(fmt: str, level: str, stream: Any = None) -> None:
    """Configure the root logger once, at start."""
    handler = BufferedStreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])
    # aiosmtpd logs every command at INFO: far too chatty for an MX.
    logging.getLogger("mail.log").setLevel(max(logging.WARNING, _LEVELS[level]))


class EventLog:
    """The proxy's own structured events.

    When our handler is the only one (as ``setup_logging`` leaves it), an event
    is formatted and queued directly, without building a LogRecord: logging
    three lines per message that way costs about half as much. Anything else
    (tests capturing logs, an embedding application) goes through logging.
    """

    def __init__(self) -> None:
        self.txn_log = logging.getLogger("smtpproxy.transaction")
        self.conn_log = logging.getLogger("smtpproxy.connection")

    def _emit(self, logger: logging.Logger, msg: str, fields: dict[str, Any]) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        root = logging.getLogger()
        handler = root.handlers[0] if len(root.handlers) == 1 and not logger.handlers else None
        if isinstance(handler, BufferedStreamHandler) and isinstance(handler.formatter, LineFormatter):
            handler.add_line(handler.formatter.line(time.time(), "info", logger.name, msg, fields))
        else:
            logger.info(msg, extra={"fields": fields})

    def connection_open(self, session: Session) -> None:
        """A client connected."""
        self._emit(self.conn_log, "connect", {"session": session.id, "client_ip": session.client_address})

    def connection_closed(self, session: Session) -> None:
        """A client is gone."""
        fields = {
            "session": session.id,
            "client_ip": session.client_address,
            "helo": session.helo,
            "tls": session.tls.version if session.tls else None,
            "transactions": session.transactions,
            "errors": session.errors,
            "duration": round(time.monotonic() - session.started, 3),
        }
        self._emit(self.conn_log, "disconnect", fields)

    def transaction(
        self,
        session: Session,
        txn: Transaction,
        action: str,
        stage: str,
        reason: str,
        reply: Reply | None,
        rcpts: list[tuple[str, str, tuple[str, ...]]],
        mode: str = "proxy",
    ) -> None:
        """The one line per transaction (``rcpts``: address, reply, parameters of each RCPT; ``mode``: proxy or milter)."""
        results: dict[str, Any] = {}
        for name, value in txn.results.items():
            results[name] = [r.result for r in value] if isinstance(value, list) else value.result
        fields: dict[str, Any] = {
            "session": session.id,
            "txn": txn.id,
            "client_ip": session.client_address,
            "helo": session.helo,
            "tls": session.tls.version if session.tls else None,
            "mail_from": txn.mail_from,
            "mail_params": list(txn.mail_params),
            "mail_reply": txn.mail_reply,
            # Parameters (NOTIFY, ORCPT) only where given: most recipients have none.
            "rcpts": [
                {"addr": a, "reply": r, "params": list(p)} if p else {"addr": a, "reply": r}
                for a, r, p in rcpts
            ],
            "size": txn.size,
            "action": action,
            "stage": stage,
            "reason": reason,
            "reply": reply.render() if reply else None,
            "queue_id": txn.queue_id,
            "message_id": txn.message_id,
            "score": txn.score,
            "rules": txn.matched_rules,
            "results": results,
            "duration": round(time.monotonic() - txn.started, 4),
            "mode": mode,
        }
        self._emit(self.txn_log, "transaction", fields)
