"""The milter listener: TCP or a unix socket (mode 0660), its connections, and their drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time

from smtpproxy.config.milter import MilterAddress
from smtpproxy.milter.connection import MilterConnection
from smtpproxy.milter.context import MilterContext

log = logging.getLogger("smtpproxy.milter")

SOCKET_MODE = 0o660  # the MTA's group (postfix) may connect, nobody else


class MilterServer:
    """Accepts MTA connections and runs one :class:`MilterConnection` for each."""

    def __init__(self, app: MilterContext, address: MilterAddress) -> None:
        self.app = app
        self.address = address
        self.connections: set[MilterConnection] = set()
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Bind and serve; a stale unix socket file of an earlier run is replaced."""
        addr = self.address
        if addr.path is not None:
            with contextlib.suppress(FileNotFoundError):
                if addr.path.is_socket():
                    addr.path.unlink()
            self._server = await asyncio.start_unix_server(self._serve, path=str(addr.path), backlog=1024)
            os.chmod(addr.path, SOCKET_MODE)
        else:
            self._server = await asyncio.start_server(
                self._serve,
                host=addr.host,
                port=addr.port,
                family=socket.AF_INET6 if ":" in addr.host else socket.AF_UNSPEC,
                reuse_address=True,
                backlog=1024,
            )

    @property
    def serving(self) -> bool:
        """True while the listener accepts."""
        return self._server is not None and self._server.is_serving()

    @property
    def bound(self) -> str:
        """Where we listen, as the MTA's setting would name it (``inet:host:port`` or ``unix:path``)."""
        if self.address.path is not None:
            return f"unix:{self.address.path}"
        assert self._server is not None
        host, port = self._server.sockets[0].getsockname()[:2]
        return f"inet:{host}:{port}"

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = MilterConnection(self.app, reader, writer)
        self.connections.add(conn)
        metrics = self.app.metrics
        metrics.milter_connections_active.set(len(self.connections))
        try:
            await conn.serve()
        except Exception:
            # A bug of ours ends this connection (the MTA applies its default action), never the process.
            log.exception("milter connection failed")
            writer.close()
        finally:
            self.connections.discard(conn)
            metrics.milter_connections_active.set(len(self.connections))
            metrics.milter_connections.inc()

    async def stop(self, grace: float) -> None:
        """Stop accepting; connections between transactions close now, the others within ``grace``."""
        if self._server is not None:
            self._server.close()
        deadline = time.monotonic() + grace
        while self.connections:
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.idle or now >= deadline:
                    conn.closing = True
                    conn.writer.close()
            if now >= deadline:
                break
            await asyncio.sleep(0.05)
        for _ in range(100):  # let the closed connections run their finish()
            if not self.connections:
                break
            await asyncio.sleep(0.01)
        if self.address.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.address.path.unlink()
