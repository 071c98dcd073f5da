"""The metrics port: ``/metrics`` (Prometheus text, or OpenMetrics via Accept), ``/healthz``, ``/readyz``.

A deliberately tiny HTTP/1.0 responder on asyncio: three GET endpoints do not
justify a web framework, and it runs on the proxy's own event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, exposition
from prometheus_client.openmetrics import exposition as openmetrics

log = logging.getLogger("smtpproxy.http")

ReadyProbe = Callable[[], Awaitable[str | None]]
MAX_REQUEST = 8192


class MetricsServer:
    """Serves the registry and health endpoints on ``host:port``."""

    def __init__(self, registry: CollectorRegistry, ready: ReadyProbe, host: str, port: int) -> None:
        self.registry = registry
        self.ready = ready
        self.host = host
        self.port = port
        self._server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        """Bind and start serving."""
        self._server = await asyncio.start_server(self._serve, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop listening."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            status, ctype, body = await self._respond(head[:MAX_REQUEST])
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        except Exception:
            log.exception("metrics endpoint failed")
            status, ctype, body = "500 Internal Server Error", "text/plain", b"internal error\n"
        writer.write(
            f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _respond(self, head: bytes) -> tuple[str, str, bytes]:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            return "405 Method Not Allowed", "text/plain", b"only GET\n"
        path = parts[1].split("?", 1)[0]
        headers = {
            k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:] if line)
        }
        if path == "/metrics":
            accept = headers.get("accept", "")
            if "application/openmetrics-text" in accept:
                return "200 OK", openmetrics.CONTENT_TYPE_LATEST, openmetrics.generate_latest(self.registry)  # type: ignore[no-untyped-call]
            return "200 OK", exposition.CONTENT_TYPE_LATEST, exposition.generate_latest(self.registry)
        if path == "/healthz":
            return "200 OK", "text/plain", b"ok\n"
        if path == "/readyz":
            problem = await self.ready()
            if problem is None:
                return "200 OK", "text/plain", b"ready\n"
            return "503 Service Unavailable", "text/plain", (problem + "\n").encode("utf-8", "replace")
        return "404 Not Found", "text/plain", b"not found\n"
