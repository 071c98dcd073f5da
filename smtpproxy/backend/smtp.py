"""The SMTP backend: pooled aiosmtplib connections, one per transaction at a time.

A connection is taken from the pool at MAIL and given back after the
transaction (RSET when it ended early). Every command has a timeout; every
transport failure becomes a 4xx reply for the client and the connection is
thrown away, never reused in an unknown state. A connection that carried a
client's XCLIENT identity is never pooled (see ``forward``); with
``require_tls`` no transaction goes over a connection without TLS.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque

import aiosmtplib
from aiosmtplib.errors import (
    SMTPConnectResponseError,
    SMTPException,
    SMTPResponseException,
)

from smtpproxy.addresses import parse_hostport
from smtpproxy.backend import (
    BUSY,
    GARBLED,
    IDENTITY_REFUSED,
    UNREACHABLE,
    ClientFacts,
)
from smtpproxy.backend.forward import client_attributes, ehlo_name
from smtpproxy.backend.wire import IdentityRefused, StartTlsFailed, TlsRequired, failure, wire_parts
from smtpproxy.config import BackendOptions
from smtpproxy.metrics import Metrics
from smtpproxy.verdict import Reply

log = logging.getLogger("smtpproxy.backend")

# A pooled connection idle longer than this gets a NOOP before reuse, so a
# backend that closed it meanwhile costs a reconnect, not a failed transaction.
NOOP_AFTER = 2.0


class _Connection:
    """One backend SMTP session and when it was last used."""

    def __init__(self, client: aiosmtplib.SMTP) -> None:
        self.client = client
        self.idle_since = time.monotonic()
        self.transactions = 0
        # The client this connection was made to stand for with XCLIENT: the
        # backend believes it for the rest of the session, so the connection
        # serves that one transaction and is closed, never pooled.
        self.identity: ClientFacts | None = None

    @property
    def alive(self) -> bool:
        return self.client.is_connected

    def close(self) -> None:
        try:
            self.client.close()
        except Exception:  # closing a dead transport must never raise into a session
            log.debug("error closing backend connection", exc_info=True)


class SmtpTransaction:
    """One envelope relayed over a pooled connection."""

    def __init__(self, backend: SmtpBackend, conn: _Connection, client: ClientFacts, reused: bool) -> None:
        self.backend = backend
        self.conn = conn
        self.client = client
        self.reused = reused
        self.broken = False
        self.state = "new"  # new -> mail -> data -> done

    async def _command(self, name: str, *args: bytes) -> Reply:
        opts = self.backend.options
        started = time.perf_counter()
        try:
            response = await self.conn.client.execute_command(*args, timeout=opts.command_timeout)
        except (SMTPException, OSError, ValueError) as err:
            return self._broke(name, err)
        finally:
            self.backend.metrics.backend_latency.labels(name).observe(time.perf_counter() - started)
        return self._reply(name, response.code, response.message)

    def _reply(self, name: str, code: int, message: str) -> Reply:
        if not 200 <= code <= 599:
            self.broken = True
            self.backend.metrics.backend_errors.labels("protocol").inc()
            return GARBLED
        reply = Reply.parse(code, message)
        self.backend.metrics.backend_replies.labels(name, reply.klass).inc()
        if code == 421:
            # The backend is closing its side: the transaction cannot go on.
            # A 421 passed through would close the *client's* connection, so
            # answer for this transaction only.
            self.broken = True
            return Reply(451, "4.3.0", f"Backend not available: {reply.text}"[:200])
        return reply

    def _broke(self, name: str, err: BaseException) -> Reply:
        kind, reply = failure(err)
        self.broken = True
        self.backend.metrics.backend_errors.labels(kind).inc()
        log.warning("backend %s failed: %s: %s", name, type(err).__name__, err)
        return reply

    async def mail(self, sender: str, params: list[str]) -> Reply:
        """MAIL FROM, preceded by XFORWARD when configured (``begin`` made sure it is offered)."""
        self.state = "mail"
        if self.backend.options.forward_client == "xforward":
            # The complete set every time: nothing of an earlier client on this
            # pooled connection may survive into this transaction.
            reply = await self._command("xforward", b"XFORWARD", *client_attributes(self.client))
            if not reply.is_positive:
                if not self.broken:
                    self.backend.metrics.backend_errors.labels("identity").inc()
                    log.warning("backend refused XFORWARD: %s", reply.render())
                return reply if reply.is_transient else IDENTITY_REFUSED
        addr = f"FROM:<{sender}>".encode("utf-8", "surrogateescape")
        return await self._command("mail", b"MAIL", addr, *(p.encode("ascii", "replace") for p in params))

    async def rcpt(self, recipient: str, params: list[str]) -> Reply:
        """RCPT TO, the backend's own reply."""
        addr = f"TO:<{recipient}>".encode("utf-8", "surrogateescape")
        return await self._command("rcpt", b"RCPT", addr, *(p.encode("ascii", "replace") for p in params))

    async def data(self, message: bytes) -> Reply:
        """DATA and the content; the backend's final reply, or a 4xx when we never got it."""
        opts = self.backend.options
        client = self.conn.client
        started = time.perf_counter()
        try:
            go_ahead = await client.execute_command(b"DATA", timeout=opts.command_timeout)
            if go_ahead.code != 354:
                return self._reply("data", go_ahead.code, go_ahead.message)
            self.state = "data"  # from here on, the connection's state is unknown until the reply
            protocol = client.protocol
            assert protocol is not None
            for part in wire_parts(message):
                protocol.write(part)
            response = await protocol.read_response(timeout=opts.data_timeout)
        except (SMTPException, OSError, ValueError, AssertionError) as err:
            return self._broke("data", err)
        finally:
            self.backend.metrics.backend_latency.labels("data").observe(time.perf_counter() - started)
        self.state = "done"
        self.conn.transactions += 1
        return self._reply("data", response.code, response.message)

    async def finish(self) -> None:
        """Give the connection back (RSET first when the transaction did not complete)."""
        if self.broken or self.state == "data":
            self.backend.discard(self.conn)
            return
        if self.state == "mail":
            reply = await self._command("rset", b"RSET")
            if not reply.is_positive:
                self.backend.discard(self.conn)
                return
        self.backend.release(self.conn)


class SmtpBackend:
    """A pool of connections to one SMTP (or SMTPS) backend."""

    def __init__(self, url: str, options: BackendOptions, hostname: str, metrics: Metrics) -> None:
        self.implicit_tls = url.startswith("smtps://")
        target = parse_hostport(url.split("://", 1)[1].rstrip("/"))
        self.host, self.port = target.host, target.port
        self.options = options
        self.helo_name = options.helo_name or hostname
        self.metrics = metrics
        self._idle: deque[_Connection] = deque()
        self._quitting: set[asyncio.Task[None]] = set()
        self._open = 0
        self._slots = asyncio.Semaphore(options.pool_size)
        self._tls_context = ssl.create_default_context()
        if not options.tls_verify:
            self._tls_context.check_hostname = False
            self._tls_context.verify_mode = ssl.CERT_NONE

    def _gauge(self) -> None:
        self.metrics.backend_pool_size.set(self._open)
        self.metrics.backend_pool_in_use.set(self._open - len(self._idle))

    def _client(self, timeout: float) -> aiosmtplib.SMTP:
        """An unconnected client for the backend (TLS per the URL; STARTTLS is ours to decide)."""
        return aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            use_tls=self.implicit_tls,
            start_tls=False,
            tls_context=self._tls_context,
            local_hostname=self.helo_name,
            timeout=timeout,
        )

    async def _connect(self) -> _Connection:
        opts = self.options
        client = self._client(opts.connect_timeout)
        # require_tls implies STARTTLS whatever ``starttls`` says: it is the
        # Postfix ``smtp_tls_security_level = encrypt`` of our side.
        want_tls = opts.starttls or opts.require_tls
        try:
            await client.connect()
            await client.ehlo(timeout=opts.command_timeout)
            if want_tls and not self.implicit_tls and client.supports_extension("starttls"):
                try:
                    await client.starttls(tls_context=self._tls_context, timeout=opts.command_timeout)
                    await client.ehlo(timeout=opts.command_timeout)
                except (SMTPException, OSError) as err:
                    # aiosmtplib reports a failed handshake as a lost connection.
                    raise StartTlsFailed(f"STARTTLS failed: {type(err).__name__}: {err}") from err
            if opts.require_tls and client.get_transport_info("sslcontext") is None:
                # Someone on the path may have removed STARTTLS from the EHLO
                # reply: no transaction in plaintext then.
                raise TlsRequired("require_tls is set and the backend did not offer STARTTLS")
        except BaseException:
            client.close()
            raise
        self.metrics.backend_up.set(1)
        return _Connection(client)

    async def _xclient(self, conn: _Connection, facts: ClientFacts) -> Reply | None:
        """XCLIENT makes the backend see the original client; it answers a new greeting.

        The EHLO that follows carries the client's HELO (``ehlo_name``): the
        backend's HELO restrictions and log must see the client's, not ours.
        Returns the backend's refusal of that HELO, to be given to the client.
        """
        if not conn.client.supports_extension("xclient"):
            raise IdentityRefused("forward_client is xclient and the backend does not offer XCLIENT")
        conn.identity = facts
        timeout = self.options.command_timeout
        response = await conn.client.execute_command(b"XCLIENT", *client_attributes(facts), timeout=timeout)
        if response.code != 220:
            raise IdentityRefused(f"XCLIENT refused: {response.code} {response.message}")
        try:
            await conn.client.ehlo(hostname=ehlo_name(facts), timeout=timeout)
        except SMTPResponseException as err:
            if not 400 <= err.code <= 599 or err.code == 421:
                raise
            return Reply.parse(err.code, err.message)
        return None

    async def begin(self, client: ClientFacts, needs: frozenset[str]) -> SmtpTransaction | Reply:
        """A connection ready for MAIL, or the 4xx reply for the client."""
        try:
            async with asyncio.timeout(self.options.connect_timeout):
                await self._slots.acquire()
        except TimeoutError:
            self.metrics.backend_errors.labels("pool_exhausted").inc()
            return BUSY
        refused: Reply | None = None
        try:
            conn, reused = await self._take()
            try:
                refused = await self._forward_identity(conn, client)
            except BaseException:
                self._open -= 1
                conn.close()
                raise
        except BaseException as err:
            self._slots.release()
            self._gauge()
            if not isinstance(err, Exception):
                raise
            return self._unavailable(err)
        self._gauge()
        if refused is not None:
            self.release(conn)
            return refused
        problem = self._unsupported(conn, needs)
        if problem is not None:
            self.release(conn)
            return problem
        return SmtpTransaction(self, conn, client, reused)

    async def _forward_identity(self, conn: _Connection, client: ClientFacts) -> Reply | None:
        """Make the backend see ``client`` on ``conn``, or raise ``IdentityRefused``.

        Never sends mail under the proxy's own identity when forwarding is
        configured: a backend not offering the command gets no transaction.
        """
        forward = self.options.forward_client
        if forward == "xclient":
            return await self._xclient(conn, client)
        if forward == "xforward" and not conn.client.supports_extension("xforward"):
            raise IdentityRefused("forward_client is xforward and the backend does not offer XFORWARD")
        return None

    def _unavailable(self, err: Exception) -> Reply:
        """Count and log why no connection is ready; the client's 4xx."""
        kind, reply = failure(err)
        if kind in ("identity", "tls_required"):
            # The backend is up but must not get this mail: refused, not "unreachable".
            self.metrics.backend_errors.labels(kind).inc()
            log.warning("backend %s:%d refused for this transaction: %s", self.host, self.port, err)
            return reply
        if kind != "tls":
            kind, reply = "connect", UNREACHABLE
        if isinstance(err, SMTPConnectResponseError):
            reply = Reply(451, "4.4.1", "Backend mail server refused the connection, please try again later")
        self.metrics.backend_errors.labels(kind).inc()
        self.metrics.backend_up.set(0)
        log.warning("backend %s:%d unavailable: %s: %s", self.host, self.port, type(err).__name__, err)
        return reply

    def _unsupported(self, conn: _Connection, needs: frozenset[str]) -> Reply | None:
        # Forwarding 8-bit or UTF-8 content to a backend that does not accept it
        # would corrupt it: refuse instead (RFC 6152, RFC 6531).
        if "SMTPUTF8" in needs and not conn.client.supports_extension("smtputf8"):
            return Reply(553, "5.6.7", "SMTPUTF8 is not supported by the destination mail server")
        if "8BITMIME" in needs and not conn.client.supports_extension("8bitmime"):
            return Reply(554, "5.6.3", "8-bit content is not supported by the destination mail server")
        return None

    async def _take(self) -> tuple[_Connection, bool]:
        now = time.monotonic()
        while self._idle:
            conn = self._idle.pop()
            fresh = conn.alive and now - conn.idle_since < self.options.pool_idle_timeout
            if fresh and (now - conn.idle_since < NOOP_AFTER or await self._still_there(conn)):
                return conn, True
            self._open -= 1
            conn.close()
        conn = await self._connect()
        self._open += 1
        return conn, False

    async def _still_there(self, conn: _Connection) -> bool:
        """NOOP a connection that sat idle: backends time out idle clients."""
        try:
            response = await conn.client.execute_command(b"NOOP", timeout=self.options.command_timeout)
        except (SMTPException, OSError):
            return False
        return response.code == 250

    def release(self, conn: _Connection) -> None:
        """Put a healthy connection back for the next transaction (closed if it carried an identity)."""
        conn.idle_since = time.monotonic()
        if conn.alive and conn.identity is None:
            self._idle.append(conn)
        else:
            self._open -= 1
            if conn.alive:
                self._quit_later(conn)
        self._slots.release()
        self._gauge()

    def _quit_later(self, conn: _Connection) -> None:
        """QUIT politely without making the client wait for it."""

        async def quit_() -> None:
            try:
                with contextlib.suppress(SMTPException, OSError):
                    await conn.client.quit(timeout=2.0)
            finally:
                conn.close()

        task = asyncio.get_running_loop().create_task(quit_())
        self._quitting.add(task)
        task.add_done_callback(self._quitting.discard)

    def discard(self, conn: _Connection) -> None:
        """Throw away a connection in an unknown state."""
        conn.close()
        self._open -= 1
        self._slots.release()
        self._gauge()

    async def probe(self) -> str | None:
        """Connect, read the greeting, QUIT: None when that works."""
        client = self._client(min(self.options.connect_timeout, 5.0))
        try:
            await client.connect()
            await client.quit()
        except (SMTPException, OSError) as err:
            self.metrics.backend_up.set(0)
            return f"backend {self.host}:{self.port}: {type(err).__name__}: {err}"
        finally:
            client.close()
        self.metrics.backend_up.set(1)
        return None

    async def sweep(self) -> None:
        """Close idle connections past ``pool_idle_timeout`` (politely, with QUIT)."""
        now = time.monotonic()
        keep: deque[_Connection] = deque()
        stale: list[_Connection] = []
        for conn in self._idle:
            if conn.alive and now - conn.idle_since < self.options.pool_idle_timeout:
                keep.append(conn)
            else:
                stale.append(conn)
        self._idle = keep
        self._open -= len(stale)
        self._gauge()
        for conn in stale:
            if conn.alive:
                with contextlib.suppress(SMTPException, OSError):
                    await conn.client.quit(timeout=2.0)
            conn.close()

    async def close(self) -> None:
        """Close every idle connection (and wait for the QUITs under way)."""
        for conn in self._idle:
            conn.close()
        self._open -= len(self._idle)
        self._idle.clear()
        self._gauge()
        if self._quitting:
            await asyncio.gather(*self._quitting, return_exceptions=True)
