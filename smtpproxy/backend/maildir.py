"""The maildir sink: each accepted message becomes one file in a Maildir.

Delivery is atomic and durable before we answer 250: write into ``tmp/``,
fsync the file, rename into ``new/``, fsync the folder (the Maildir protocol
as qmail and Dovecot use it). File I/O runs in a worker thread so a slow disk
never stalls other sessions.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

from smtpproxy.backend import ClientFacts
from smtpproxy.headers import sanitize
from smtpproxy.policy.dsn import DSN, unsupported_reply
from smtpproxy.session import new_id
from smtpproxy.verdict import Reply


def _deliver(root: Path, sender: str, message: bytes) -> str:
    name = f"{time.time_ns()}.M{new_id()}P{os.getpid()}.{socket.gethostname().replace('/', '_')}"
    tmp = root / "tmp" / name
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.write(fd, f"Return-Path: <{sanitize(sender, limit=320)}>\r\n".encode("utf-8", "surrogateescape"))
        view = memoryview(message)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, root / "new" / name)
    dir_fd = os.open(root / "new", os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return name


class MaildirTransaction:
    """One envelope delivered into the Maildir."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.broken = False
        self.sender = ""

    async def mail(self, sender: str, params: list[str]) -> Reply:
        """Accept any sender: policy ran before us."""
        self.sender = sender
        return Reply(250, "2.1.0", "Ok")

    async def rcpt(self, recipient: str, params: list[str]) -> Reply:
        """Accept any recipient that passed policy (a sink has no mailboxes)."""
        return Reply(250, "2.1.5", "Ok")

    async def data(self, message: bytes) -> Reply:
        """Write the message durably; 250 only once it is on disk."""
        try:
            name = await asyncio.to_thread(_deliver, self.root, self.sender, message)
        except OSError as err:
            self.broken = True
            return Reply(451, "4.3.0", f"Local delivery failed: {err.strerror or 'I/O error'}")
        return Reply(250, "2.0.0", f"Ok: queued as {name.split('.')[1]}")

    def unsupported(self, needs: frozenset[str], command: str) -> Reply | None:
        """A Maildir sends no delivery notifications: DSN parameters are refused."""
        return unsupported_reply(command) if DSN in needs else None

    async def finish(self) -> None:
        """Nothing to release."""


class MaildirBackend:
    """A Backend writing into ``root`` (created with cur/ new/ tmp/ when missing)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _ensure(self) -> None:
        for sub in ("cur", "new", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    async def begin(self, client: ClientFacts, needs: frozenset[str]) -> MaildirTransaction | Reply:
        """A transaction, or 451 4.3.0 when the Maildir cannot be created (or the refusal of DSN)."""
        if DSN in needs:
            return unsupported_reply("MAIL FROM")
        try:
            self._ensure()
        except OSError as err:
            return Reply(451, "4.3.0", f"Local mailbox unavailable: {err.strerror or 'I/O error'}")
        return MaildirTransaction(self.root)

    def offers(self, extension: str) -> bool:
        """A Maildir offers no DSN."""
        return extension.upper() != DSN

    async def probe(self) -> str | None:
        """Ready when the Maildir exists (or can be made) and is writable."""
        try:
            self._ensure()
        except OSError as err:
            return f"maildir {self.root}: {err.strerror}"
        if not os.access(self.root / "tmp", os.W_OK):
            return f"maildir {self.root}: not writable"
        return None

    async def sweep(self) -> None:
        """Nothing pooled."""

    async def close(self) -> None:
        """Nothing to close."""
