"""Generated JSON logs for ``smtpproxy trace``: lines in our exact format, fast to write, with planted stories.

The three line templates are made once by the real ``EventLog`` and
``JsonFormatter`` (so a change of the log format changes the generated logs
too); each line is then a ``%`` format of the template. Sessions overlap as
on a busy server: the transaction of session ``i`` comes after the connect of
session ``i + 20``, its disconnect after the connect of ``i + 40``.
"""

from __future__ import annotations

import io
import ipaddress
import logging
from dataclasses import dataclass
from pathlib import Path

from smtpproxy.logs import EventLog, flush_logs, setup_logging
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.verdict import Reply

T0 = 1_796_000_000.0  # 2026-11-30
STEP = 0.01  # seconds between sessions
TOKENS = {
    "1111111111.111": "%(ts)s",
    "SSSSSSSSSSSS": "%(sid)s",
    "TTTTTTTTTTTT": "%(txn)s",
    "203.0.113.254": "%(ip)s",
    "ffff@sender.example": "%(mail_from)s",
    "rrrr@example.org": "%(rcpt)s",
    "QQQQQQQQQQ": "%(qid)s",
    "mmmm@sender.example": "%(mid)s",
}
TARGET = 1234  # the session with the planted ids
TARGET_QUEUE_ID = "PLANTQ1A2B"
TARGET_RCPT = "Target.User@Example.org"
TARGET_MESSAGE_ID = "<plant-1@sender.example>"
TWO_TXN = 2000  # a session with two transactions, the second from NEEDLE_SENDER
NEEDLE_SENDER = "needle@sender.example"
CLIENT_IP = "198.51.100.77"


@dataclass(frozen=True, slots=True)
class Templates:
    """One line template per kind, with ``%(ts)s``, ``%(sid)s``, ... where the values go."""

    connect: str
    transaction: str
    disconnect: str


def _template(line: str) -> str:
    line = line.replace("%", "%%")
    for token, field in TOKENS.items():
        line = line.replace(token, field)
    return line


def templates() -> Templates:
    """Templates made by the real log code (the root logger is put back afterwards)."""
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    out = io.StringIO()
    setup_logging("json", "info", out)
    try:
        session = Session("SSSSSSSSSSSS", ipaddress.ip_address("203.0.113.254"), 40000, "127.0.0.1", 25)
        session.helo = "client.test"
        txn = Transaction("TTTTTTTTTTTT", "ffff@sender.example")
        txn.recipients.append(Recipient("rrrr@example.org"))
        txn.message = b"x" * 1800
        txn.queue_id = "QQQQQQQQQQ"
        txn.message_id = "<mmmm@sender.example>"
        txn.matched_rules.append("tag-newsletters")
        log = EventLog()
        log.connection_open(session)
        reply = Reply(250, "2.0.0", "Ok: queued as QQQQQQQQQQ")
        rcpts: list[tuple[str, str, tuple[str, ...]]] = [("rrrr@example.org", "250 2.1.5", ())]
        txn.mail_reply = "250 2.1.0"
        log.transaction(session, txn, "delivered", "data", "clean", reply, rcpts)
        log.connection_closed(session)
        flush_logs()
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    lines = out.getvalue().splitlines()
    fixed = []
    for line in lines:
        # The timestamp is the real clock's: make it the token.
        rest = line.partition(", ")[2]
        fixed.append('{"ts": 1111111111.111, ' + rest)
    return Templates(*(_template(line) for line in fixed))


def _session_values(i: int) -> dict[str, str]:
    values = {
        "sid": f"{0x5E0000000000 + i:012X}",
        "txn": f"{0x7A0000000000 + i:012X}",
        "ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        "mail_from": f"sender{i % 5000}@sender.example",
        "rcpt": f"user{i % 1000}@example.org",
        "qid": f"{0x4B000000 + i:X}",
        "mid": f"m{i}@sender.example",
    }
    if i == TARGET:
        values.update(qid=TARGET_QUEUE_ID, rcpt=TARGET_RCPT, mid=TARGET_MESSAGE_ID.strip("<>"))
    if i in (10, 20_000, 300_000):
        values["ip"] = CLIENT_IP
    return values


def session_ts(i: int) -> float:
    """The time of session ``i``'s transaction line."""
    return T0 + i * STEP


def write_log(path: Path, lines: int) -> int:
    """Write about ``lines`` lines (three per session, one more for ``TWO_TXN``); the number of sessions."""
    t = templates()
    sessions = max((lines - 1) // 3, 1)
    window: dict[int, dict[str, str]] = {}  # the values of the sessions still open
    with open(path, "w", encoding="utf-8", buffering=1 << 20) as f:
        write = f.write
        for step in range(sessions + 40):
            if step < sessions:
                v = window[step] = _session_values(step)
                v["ts"] = f"{T0 + step * STEP - 0.2:.3f}"
                write(t.connect % v + "\n")
            i = step - 20
            if 0 <= i < sessions:
                v = window[i]
                v["ts"] = f"{session_ts(i):.3f}"
                write(t.transaction % v + "\n")
                if i == TWO_TXN:
                    second = {**v, "txn": "7B" + v["txn"][2:], "mail_from": NEEDLE_SENDER, "qid": "NEEDLEQ1"}
                    second["ts"] = f"{session_ts(i) + 0.001:.3f}"
                    write(t.transaction % second + "\n")
            i = step - 40
            if 0 <= i < sessions:
                v = window.pop(i)
                v["ts"] = f"{T0 + i * STEP + 0.2:.3f}"
                write(t.disconnect % v + "\n")
    return sessions
