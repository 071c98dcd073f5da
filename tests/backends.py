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


class RecordingBackend:
    """An aiosmtpd server in the test's event loop; behaviour set through attributes."""

    def __init__(self, tls_context: Any = None) -> None:
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
        return SMTP(
            _Handler(self),
            enable_SMTPUTF8=True,
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
