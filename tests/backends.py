"""A scriptable, recording SMTP backend on loopback (aiosmtpd), for end-to-end tests."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP


@dataclass
class ReceivedMessage:
    """What the backend accepted."""

    mail_from: str
    rcpts: list[str]
    content: bytes
    mail_options: list[str]
    xclient: list[str] = field(default_factory=list)


class _Handler:
    def __init__(self, backend: RecordingBackend) -> None:
        self.b = backend

    async def handle_MAIL(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.b.commands.append(f"MAIL {address}")
        if self.b.drop_at == "mail":
            server.transport.close()  # type: ignore[union-attr]
            return "421 dropping"
        if self.b.mail_reply:
            return self.b.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 Sender ok"

    async def handle_RCPT(
        self, server: SMTP, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        self.b.commands.append(f"RCPT {address}")
        if self.b.drop_at == "rcpt":
            server.transport.close()  # type: ignore[union-attr]
            return "421 dropping"
        reply = self.b.rcpt_replies.get(address)
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Recipient ok"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.b.commands.append("DATA")
        if self.b.data_delay:
            await asyncio.sleep(self.b.data_delay)
        if self.b.drop_at == "data":
            server.transport.close()  # type: ignore[union-attr]
            return "421 dropping"
        if self.b.data_reply:
            return self.b.data_reply
        self.b.messages.append(
            ReceivedMessage(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
            )
        )
        return f"250 2.0.0 Ok: queued as Q{len(self.b.messages)}"

    async def handle_RSET(self, server: SMTP, session: Any, envelope: Any) -> str:
        self.b.commands.append("RSET")
        return "250 2.0.0 Ok"


class _ForwardingSMTP(SMTP):
    """aiosmtpd plus XCLIENT and XFORWARD, the way Postfix offers them to trusted clients."""

    def __init__(self, backend: RecordingBackend, *args: Any, **kwargs: Any) -> None:
        self.backend = backend
        super().__init__(*args, **kwargs)

    async def smtp_EHLO(self, hostname: str) -> None:
        # Insert the extensions before the final line of aiosmtpd's reply.
        self.backend.ehlo_sessions.add(id(self))
        pushed: list[str] = []
        original = self.push

        async def collect(status: Any) -> None:
            pushed.append(status if isinstance(status, str) else status.decode())

        self.push = collect  # type: ignore[method-assign]
        try:
            await super().smtp_EHLO(hostname)
        finally:
            self.push = original  # type: ignore[method-assign]
        last = pushed.pop() if pushed and pushed[-1].startswith("250 ") else None
        for ext in self.backend.extra_extensions:
            pushed.append(f"250-{ext}")
        if last:
            pushed.append(last)
        for line in pushed:
            await self.push(line)

    async def smtp_DATA(self, arg: str) -> None:
        if self.backend.data_command_reply:
            await self.push(self.backend.data_command_reply)
            return
        await super().smtp_DATA(arg)

    async def smtp_XCLIENT(self, arg: str) -> None:
        self.backend.forwarded.append(f"XCLIENT {arg}")
        await self.push(f"220 {self.hostname} ESMTP")

    async def smtp_XFORWARD(self, arg: str) -> None:
        self.backend.forwarded.append(f"XFORWARD {arg}")
        await self.push("250 2.0.0 Ok")


class RecordingBackend:
    """An aiosmtpd server in the test's event loop; behaviour set through attributes."""

    def __init__(
        self,
        tls_context: Any = None,
        *,
        extra_extensions: tuple[str, ...] = (),
        eight_bit: bool = True,
        smtputf8: bool = True,
    ) -> None:
        self.extra_extensions = extra_extensions
        self.forwarded: list[str] = []
        self.data_command_reply: str | None = None  # a reply to the DATA command itself
        self.ehlo_sessions: set[int] = set()  # connections that said EHLO (probes do not)
        self.eight_bit = eight_bit
        self.smtputf8 = smtputf8
        self.messages: list[ReceivedMessage] = []
        self.commands: list[str] = []
        self.rcpt_replies: dict[str, str] = {}
        self.mail_reply: str | None = None
        self.data_reply: str | None = None
        self.data_delay: float = 0.0
        self.drop_at: str | None = None
        self.tls_context = tls_context
        self.connections = 0
        self.port = 0
        self._server: asyncio.base_events.Server | None = None

    def _factory(self) -> SMTP:
        self.connections += 1
        return _ForwardingSMTP(
            self,
            _Handler(self),
            enable_SMTPUTF8=self.smtputf8,
            decode_data=not self.eight_bit,
            hostname="backend.test",
            tls_context=self.tls_context,
            loop=asyncio.get_running_loop(),
        )

    async def start(self, port: int = 0) -> None:
        """Listen on 127.0.0.1 (``port`` 0: a free one)."""
        self._server = await asyncio.get_running_loop().create_server(self._factory, "127.0.0.1", port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening (existing connections are closed too)."""
        if self._server is not None:
            self._server.close()
            self._server = None
