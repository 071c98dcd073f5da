"""A raw SMTP test client: exact bytes in, parsed replies out (no client-side cleverness)."""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass

_REPLY_LINE = re.compile(rb"^(\d{3})([ -])(.*)$")


@dataclass
class SmtpReply:
    """A reply: code and the text lines (without codes)."""

    code: int
    lines: list[str]

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def __str__(self) -> str:
        return f"{self.code} {self.text}"


class RawClient:
    """Connects, reads replies, sends raw lines."""

    def __init__(self, host: str, port: int, timeout: float = 10.0) -> None:
        self.host, self.port, self.timeout = host, port, timeout
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> SmtpReply:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        return await self.reply()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(ConnectionError, OSError):
                await self.writer.wait_closed()

    async def reply(self) -> SmtpReply:
        """Read one (possibly multi-line) reply; raises ConnectionError when the server closed."""
        assert self.reader is not None
        lines: list[str] = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), self.timeout)
            if not raw:
                raise ConnectionError("server closed the connection")
            m = _REPLY_LINE.match(raw.rstrip(b"\r\n"))
            if not m:
                raise AssertionError(f"malformed reply line {raw!r}")
            lines.append(m.group(3).decode("utf-8", "replace"))
            if m.group(2) == b" ":
                return SmtpReply(int(m.group(1)), lines)

    async def send(self, data: bytes) -> None:
        assert self.writer is not None
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> SmtpReply:
        """Send one command line (CRLF added) and read its reply."""
        data = line if isinstance(line, bytes) else line.encode("utf-8")
        await self.send(data + b"\r\n")
        return await self.reply()

    async def closed(self) -> bool:
        """True when the server has closed the connection (EOF within the timeout)."""
        assert self.reader is not None
        try:
            data = await asyncio.wait_for(self.reader.read(1), self.timeout)
        except (ConnectionError, OSError):
            return True
        return data == b""

    async def send_message(
        self, mail_from: str, rcpts: list[str], body: bytes, helo: str = "client.test"
    ) -> SmtpReply:
        """EHLO (when needed), MAIL, RCPTs, DATA; returns the final reply (or the first failure)."""
        r = await self.cmd(f"EHLO {helo}")
        assert r.code == 250, r
        r = await self.cmd(f"MAIL FROM:<{mail_from}>")
        if r.code != 250:
            return r
        ok = 0
        for rcpt in rcpts:
            r = await self.cmd(f"RCPT TO:<{rcpt}>")
            ok += r.code == 250
        if not ok:
            return r
        r = await self.cmd("DATA")
        if r.code != 354:
            return r
        return await self.cmd(dot_stuff(body) + b".")


def dot_stuff(body: bytes) -> bytes:
    """Dot-stuff a CRLF message and make sure it ends with CRLF."""
    if not body.endswith(b"\r\n"):
        body += b"\r\n"
    lines = body.split(b"\r\n")
    return b"\r\n".join(b"." + line if line.startswith(b".") else line for line in lines)


def make_message(subject: str = "test", body: str = "Hello.\r\n", extra: str = "") -> bytes:
    """A small valid message with CRLF line ends."""
    return (
        f"From: Sender <sender@sender.example>\r\nTo: user@example.org\r\nSubject: {subject}\r\n"
        f"Message-ID: <m{abs(hash(subject + body))}@sender.example>\r\nDate: Sat, 28 Nov 2026 10:00:00 +0000\r\n"
        f"{extra}\r\n{body}"
    ).encode()
