"""A scriptable SMTP backend for fault injection: it misbehaves exactly where told.

``FaultyBackend(fault=...)`` where fault is one of:
  none, no_greeting, greet_421, garbage_greeting, bad_starttls, drop_after_mail, drop_after_rcpt,
  drop_in_data, drop_after_dot, stall_mail, stall_after_dot, garbage_reply_rcpt.
Messages it accepted are in ``delivered``; set ``fault = "none"`` to recover.
"""

from __future__ import annotations

import asyncio


class FaultyBackend:
    """A tiny hand-written SMTP server (no library: it must be able to break the protocol)."""

    def __init__(self, fault: str = "none", stall: float = 30.0) -> None:
        self.fault = fault
        self.stall = stall
        self.delivered: list[bytes] = []
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            w.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            await self._dialogue(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _dialogue(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        fault = self.fault
        if fault == "no_greeting":
            await asyncio.sleep(self.stall)
            return
        if fault == "greet_421":
            writer.write(b"421 4.3.2 Not now\r\n")
            return
        if fault == "garbage_greeting":
            writer.write(b"\x00\xffHELLO?\r\n")
            return
        writer.write(b"220 faulty.test ESMTP\r\n")
        while True:
            line = await reader.readline()
            if not line:
                return
            verb = line[:4].upper()
            fault = self.fault
            if verb in (b"EHLO", b"HELO"):
                tls = b"250-STARTTLS\r\n" if fault == "bad_starttls" else b""
                writer.write(
                    b"250-faulty.test\r\n" + tls + b"250-PIPELINING\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n"
                )
            elif verb == b"STAR":
                writer.write(b"220 2.0.0 Ready to start TLS\r\n")
                await writer.drain()
                writer.write(b"this is not a TLS handshake\r\n" * 4)
                await writer.drain()
                return
            elif verb == b"MAIL":
                if fault == "drop_after_mail":
                    return
                if fault == "stall_mail":
                    await asyncio.sleep(self.stall)
                writer.write(b"250 2.1.0 Ok\r\n")
            elif verb == b"RCPT":
                if fault == "drop_after_rcpt":
                    return
                writer.write(b"2x0 what\r\n" if fault == "garbage_reply_rcpt" else b"250 2.1.5 Ok\r\n")
            elif verb == b"DATA":
                writer.write(b"354 Go ahead\r\n")
                await writer.drain()
                content = await reader.readuntil(b"\r\n.\r\n")
                if fault == "drop_in_data":
                    return
                if fault == "drop_after_dot":
                    self.delivered.append(content)  # taken, but the reply never arrives
                    return
                if fault == "stall_after_dot":
                    self.delivered.append(content)
                    await asyncio.sleep(self.stall)
                    return
                self.delivered.append(content)
                writer.write(b"250 2.0.0 Ok: queued as F1\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 2.0.0 Bye\r\n")
                return
            else:
                writer.write(b"250 2.0.0 Ok\r\n")
            await writer.drain()
