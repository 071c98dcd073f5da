"""The maildir quarantine as operators work with it: list, show, release, delete.

A message quarantined into a ``maildir:`` destination is a file in its ``new/``
(or ``cur/``) folder: the ``Return-Path`` line the maildir writes, then the
message with the headers added at quarantine time (:func:`quarantine_headers`):
the rules that matched, the score, and the envelope recipients. The envelope
cannot be read back from ``To:``/``Cc:`` (Bcc recipients, lists, aliases), so it
travels in a header, and release removes our headers again before the message
goes to the backend.

The ID of a message is the unique part of its file name, the one the maildir
answered as "queued as ID" (and the log line of the quarantine shows).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.parser import BytesHeaderParser
from email.policy import compat32
from pathlib import Path
from typing import TYPE_CHECKING

from smtpproxy.headers import sanitize
from smtpproxy.verdict import HeaderEdit, HeaderEditKind, Reply

if TYPE_CHECKING:
    from smtpproxy.config import Config
    from smtpproxy.session import Transaction

log = logging.getLogger("smtpproxy.quarantine")

# Written by the rules' quarantine action (the rule's name, or "score").
REASON_HEADER = "X-Smtpproxy-Quarantine"
RULES_HEADER = "X-Smtpproxy-Quarantine-Rules"
SCORE_HEADER = "X-Smtpproxy-Quarantine-Score"
ENVELOPE_HEADER = "X-Smtpproxy-Envelope-To"
OUR_HEADERS = frozenset(h.lower() for h in (REASON_HEADER, RULES_HEADER, SCORE_HEADER, ENVELOPE_HEADER))

_ID = re.compile(r"^[A-Za-z0-9]{1,64}$")


class QuarantineError(Exception):
    """An operator's request that cannot be done: no such message, unreadable folder."""


def quarantine_headers(txn: Transaction) -> list[HeaderEdit]:
    """The headers a quarantined message carries: matched rules, score, envelope recipients."""
    rules = ", ".join(dict.fromkeys(txn.matched_rules)) or "none"
    recipients = ", ".join(f"<{r.address}>" for r in txn.recipients)
    return [
        HeaderEdit(HeaderEditKind.ADD, RULES_HEADER, sanitize(rules)),
        HeaderEdit(HeaderEditKind.ADD, SCORE_HEADER, f"{txn.score:.1f}"),
        HeaderEdit(HeaderEditKind.ADD, ENVELOPE_HEADER, sanitize(recipients, limit=64 * 1024)),
    ]


@dataclass(frozen=True, slots=True)
class Quarantined:
    """One quarantined message, as read from its file."""

    id: str
    path: Path
    sender: str
    recipients: tuple[str, ...]
    reason: str
    rules: tuple[str, ...]
    score: str
    subject: str
    date: str
    size: int


def _split(data: bytes) -> tuple[str, bytes]:
    """The Return-Path sender and the message after it."""
    first, sep, rest = data.partition(b"\n")
    if sep and first.lower().startswith(b"return-path:"):
        value = first.split(b":", 1)[1].strip().decode("utf-8", "replace")
        return value.strip("<>"), rest
    return "", data


def _parse(path: Path) -> Quarantined:
    data = path.read_bytes()
    sender, message = _split(data)
    headers = BytesHeaderParser(policy=compat32).parsebytes(message)

    def one(name: str) -> str:
        return " ".join(str(headers.get(name, "")).split())

    envelope = [a.strip().strip("<>") for a in one(ENVELOPE_HEADER).split(",") if a.strip()]
    rules = [r.strip() for r in one(RULES_HEADER).split(",") if r.strip() and r.strip() != "none"]
    return Quarantined(
        id=message_id(path),
        path=path,
        sender=sender,
        recipients=tuple(envelope),
        reason=one(REASON_HEADER),
        rules=tuple(rules),
        score=one(SCORE_HEADER),
        subject=one("Subject"),
        date=one("Date"),
        size=len(message),
    )


def message_id(path: Path) -> str:
    """The ID in a maildir file name ``TIME.ID.HOST[:2,FLAGS]``."""
    parts = path.name.split(".")
    return parts[1] if len(parts) > 2 else path.name


def for_release(data: bytes) -> tuple[str, bytes]:
    """The sender and the message as it arrived: without Return-Path and our quarantine headers."""
    sender, message = _split(data)
    lines = message.splitlines(keepends=True)
    kept: list[bytes] = []
    dropping = False
    for index, line in enumerate(lines):
        if line in (b"\r\n", b"\n"):
            kept.extend(lines[index:])
            break
        if line[:1] in (b" ", b"\t"):
            if not dropping:
                kept.append(line)
            continue
        name = line.split(b":", 1)[0].strip().decode("ascii", "replace").lower()
        dropping = name in OUR_HEADERS
        if not dropping:
            kept.append(line)
    return sender, b"".join(kept)


class QuarantineFolder:
    """A maildir folder of quarantined messages."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _files(self) -> Iterator[Path]:
        for sub in ("new", "cur"):
            folder = self.root / sub
            if folder.is_dir():
                yield from (p for p in folder.iterdir() if p.is_file())

    def list(self) -> list[Quarantined]:
        """Every message, oldest first (maildir names start with the delivery time)."""
        if not self.root.is_dir():
            raise QuarantineError(f"quarantine folder {self.root}: no such folder")
        return sorted((_parse(p) for p in self._files()), key=lambda q: q.path.name)

    def find(self, ident: str) -> Path:
        """The file of message ``ident``, or QuarantineError."""
        if not _ID.match(ident):
            raise QuarantineError(f"{ident!r}: expected a quarantine ID as `smtpproxy quarantine list` shows")
        for path in self._files():
            if message_id(path) == ident:
                return path
        raise QuarantineError(f"no quarantined message {ident} in {self.root}")

    def show(self, ident: str) -> Quarantined:
        """The message ``ident``, parsed."""
        return _parse(self.find(ident))

    def delete(self, ident: str) -> Path:
        """Remove message ``ident``; returns the file it was."""
        path = self.find(ident)
        path.unlink()
        log.info("quarantine deleted", extra={"fields": {"id": ident, "folder": str(self.root)}})
        return path


def _needs(sender: str, recipients: tuple[str, ...], message: bytes) -> frozenset[str]:
    needs = set()
    if not message.isascii():
        needs.add("8BITMIME")
    if not all(a.isascii() for a in (sender, *recipients)):
        needs.add("SMTPUTF8")
    return frozenset(needs)


async def release(config: Config, folder: QuarantineFolder, ident: str, *, keep: bool = False) -> Reply:
    """Re-inject message ``ident`` into the config's backend; remove it once the backend said 250.

    The backend sees the proxy host itself as the client (127.0.0.1, our hostname),
    as ``amavisd-release`` does. Any other reply leaves the message in quarantine.
    """
    from smtpproxy.backend import ClientFacts
    from smtpproxy.backend.factory import make_backend
    from smtpproxy.backend.relay import relay_message
    from smtpproxy.metrics import Metrics

    path = folder.find(ident)
    item = _parse(path)
    if not item.recipients:
        raise QuarantineError(f"message {ident} has no {ENVELOPE_HEADER} header: its recipients are unknown")
    sender, message = for_release(path.read_bytes())
    backend = make_backend(config.backend, config, Metrics(process=False))
    facts = ClientFacts("127.0.0.1", config.hostname, "localhost", True)
    try:
        reply = await relay_message(
            backend, facts, sender, item.recipients, message, _needs(sender, item.recipients, message)
        )
    finally:
        await backend.close()
    fields = {
        "id": ident,
        "folder": str(folder.root),
        "reply": str(reply),
        "recipients": len(item.recipients),
    }
    if reply.is_positive:
        if not keep:
            path.unlink()
        log.info("quarantine released", extra={"fields": fields})
    else:
        log.warning("quarantine release refused", extra={"fields": fields})
    return reply
