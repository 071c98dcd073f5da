"""Inbound SMTP on aiosmtpd: connect stage, PROXY protocol, TLS facts, timeouts, reply codes.

aiosmtpd has no connect hook and answers some errors without enhanced
status codes; this subclass adds both, makes the idle timeout answer
``421 4.4.2``, offers only the extensions we honour, and turns an unexpected
exception into ``451 4.3.0`` (a bug of ours must never become a bounce).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP, TLSSetupException, _AuthMechAttr, login_always_fail, syntax

from smtpproxy.dataread import DataProblem, read_data
from smtpproxy.handler import ConnectionHandler
from smtpproxy.inflight import Ticket
from smtpproxy.policy.dsn import KEYWORDS as DSN_KEYWORDS
from smtpproxy.replies import ERROR_KINDS, INTERNAL_ERROR, SHUTTING_DOWN, with_enhanced_code
from smtpproxy.session import Session, TlsInfo, new_id
from smtpproxy.tls import handshake_failure_reason

if TYPE_CHECKING:
    from smtpproxy.context import ConnectionContext

log = logging.getLogger("smtpproxy.server")

_SIMPLE_PATH = re.compile(
    r"^<((?![.])[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]+(?<![.])@[A-Za-z0-9\-\u0080-\U0010ffff]+"
    r"(?:\.[A-Za-z0-9\-\u0080-\U0010ffff]+)*)>(.*)$",
    re.DOTALL,
)

# Replies held back while more pipelined commands wait are sent at the latest
# at this size (RFC 2920 §3.1 lets a server buffer replies until it would block).
_HELD_REPLIES_MAX = 16384
# Final replies never held back: the TLS handshake and the end of the session
# follow them at once.
_NEVER_HELD = (b"220", b"221")


class _FlushingReader(asyncio.StreamReader):
    """A StreamReader that sends the replies held back before it waits for the client.

    It reads ``_buffer`` (StreamReader's own bytearray, as aiosmtpd does at
    STARTTLS) to know whether a read can be answered without waiting;
    test_server_internals pins that attribute.
    """

    def __init__(self, *, loop: asyncio.AbstractEventLoop, limit: int) -> None:
        super().__init__(loop=loop, limit=limit)
        self.before_wait: Callable[[], None] | None = None

    def has_line(self) -> bool:
        """True when a complete command line is already buffered."""
        return b"\n" in self._buffer  # type: ignore[attr-defined]

    async def readuntil(self, separator: bytes = b"\n") -> bytes:  # type: ignore[override]
        if self.before_wait is not None and separator not in self._buffer:  # type: ignore[attr-defined]
            self.before_wait()
        return await super().readuntil(separator)

    async def readexactly(self, n: int) -> bytes:
        if self.before_wait is not None and len(self._buffer) < n:  # type: ignore[attr-defined]
            self.before_wait()
        return await super().readexactly(n)

    async def read(self, n: int = -1) -> bytes:
        if self.before_wait is not None and not self._buffer:  # type: ignore[attr-defined]
            self.before_wait()
        return await super().read(n)


NO_STORAGE = "452 4.3.1 Insufficient system storage, try again later"


def declared_size(mail_options: list[str], limit: int | None) -> int:
    """The SIZE= the client declared at MAIL (RFC 1870), at most ``limit``; 0 when none."""
    for option in mail_options:
        if option[:5].upper() == "SIZE=" and option[5:].isdigit():
            size = int(option[5:])
            return min(size, limit) if limit else size
    return 0


_HOOKS = ("PROXY", "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT", "STARTTLS", "AUTH")
# The AUTH= parameter of MAIL (RFC 4954 §5): aiosmtpd would answer 555 to it.
_AUTH_PARAM = re.compile(r"[ \t]+AUTH=(\S*)", re.IGNORECASE)


class InboundSMTP(SMTP):
    """One client connection (aiosmtpd creates one protocol object per connection)."""

    def __init__(
        self, app: ConnectionContext, *, submission: bool = False, implicit_tls: bool = False
    ) -> None:
        # aiosmtpd's own __init__ introspects the class and the handler (inspect.
        # getmembers, dir, signature) for every connection: a fifth of the CPU of
        # a short session. We set the same attributes from what is computed once
        # per class; test_aiosmtpd_attributes pins the list to the aiosmtpd version.
        self.app = app
        cfg = app.config
        loop = asyncio.get_running_loop()
        self.line_length_limit = cfg.limits.max_line_length + 2
        self.session_facts: Session | None = None
        self.conn: ConnectionHandler | None = None
        self.dsn_params: list[str] = []  # of the MAIL/RCPT being parsed, as the client wrote them
        self._held: list[bytes] = []  # replies not written yet (see push)
        reader = _FlushingReader(loop=loop, limit=self.line_length_limit)
        reader.before_wait = self._write_held
        asyncio.StreamReaderProtocol.__init__(
            self, reader, client_connected_cb=self._cb_client_connected, loop=loop
        )
        handler = _HandlerShim(self)
        self.__ident__ = "ESMTP smtpproxy"
        self.loop = loop
        self.event_handler = handler
        self.data_size_limit = cfg.limits.max_message_size
        self.enable_SMTPUTF8 = True
        self._decode_data = False
        # Per connection: aiosmtpd's class-level dict would be shared by all sessions.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        self.hostname = cfg.hostname
        # On the implicit-TLS port the connection is TLS from the first byte: no STARTTLS to offer.
        self.tls_context = None if implicit_tls else app.tls_context
        self.submission = submission
        self.implicit_tls = implicit_tls
        self.require_starttls = False
        self._timeout_duration = cfg.limits.idle_timeout
        self._timeout_handle = None
        self._tls_handshake_okay = True
        self._tls_protocol = None
        self._original_transport = None
        self.session = None
        self.envelope = None
        self.transport = None
        self._handler_coroutine = None
        # The policy decides (538 before TLS, implicit TLS included); aiosmtpd only sees STARTTLS.
        self._auth_require_tls = not submission
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        # An MX offers no AUTH; the submission port PLAIN and LOGIN, through handle_AUTH
        # (aiosmtpd only checks the names here before it calls the hook).
        self._auth_methods = (
            {
                "PLAIN": _AuthMechAttr(self.auth_PLAIN, True),
                "LOGIN": _AuthMechAttr(self.auth_LOGIN, True),
            }
            if submission
            else {}
        )
        self._handle_hooks = {name: getattr(handler, f"handle_{name}") for name in _HOOKS}
        self._ehlo_hook_ver = "new"
        self._smtp_methods = {name: getattr(self, f"smtp_{name}") for name in SMTP_COMMANDS}
        self._enforce_call_limit = False

    # -- connection lifecycle -----------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.session_facts is not None:
            # STARTTLS: aiosmtpd calls us again with the TLS transport.
            super().connection_made(transport)
            self._after_starttls(transport)
            return
        peer = transport.get_extra_info("peername") or ("0.0.0.0", 0)
        sock = transport.get_extra_info("sockname") or ("0.0.0.0", 0)
        ip = ipaddress.ip_address(peer[0].split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        self.session_facts = Session(new_id(), ip, int(peer[1]), str(sock[0]), int(sock[1]))
        self.session_facts.submission = self.submission
        if self.implicit_tls:
            self.session_facts.tls = _tls_info(transport)
        self.conn = ConnectionHandler(self.app, self.session_facts)
        self._proxy_timeout = self.app.proxy_timeout_for(ip)
        if not self.app.admit(self):
            self.session_facts = None
            transport.write(b"421 4.7.0 Too many connections, please try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            self.app.metrics.connections_rejected.labels("max_connections").inc()
            return
        super().connection_made(transport)
        assert self._handler_coroutine is not None
        self._handler_coroutine.add_done_callback(self._handler_done)
        self.app.logs.connection_open(self.session_facts)

    def _handler_done(self, task: asyncio.Task[None]) -> None:
        # aiosmtpd's eof_received cancels the command task and keeps the socket
        # half-open, trusting the task to close it; a task cancelled before it
        # ran, or while awaiting the connect stage or a PROXY header, never does,
        # and the connection would sit in CLOSE-WAIT, counted, until the idle
        # timeout. Whenever the task ends, the session is over: close now.
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()

    def _after_starttls(self, transport: asyncio.BaseTransport) -> None:
        assert self.session_facts is not None
        tls = _tls_info(transport)
        if tls is not None:
            self.session_facts.tls = tls
        # RFC 3207 §4.2: forget what the client said before TLS.
        self.session_facts.helo = None
        self.session_facts.esmtp = False
        self.session_facts.dsn_offered = False

    def connection_lost(self, error: Exception | None) -> None:
        facts = self.session_facts
        if facts is None:
            return  # refused before it started
        self._held.clear()
        if isinstance(self._reader, _FlushingReader):
            self._reader.before_wait = None  # no reference cycle reader -> protocol left
        super().connection_lost(error)
        self.session_facts = None
        self.app.release(self)
        if self.conn is not None:
            self.app.spawn(self.conn.connection_lost())
        self.app.logs.connection_closed(facts)

    def data_received(self, data: bytes) -> None:
        self._last_activity = self.loop.time()
        super().data_received(data)

    def _timeout_cb(self) -> None:
        idle = self.app.config.limits.idle_timeout
        elapsed = self.loop.time() - getattr(self, "_last_activity", 0.0)
        busy = self.conn is not None and self.conn.busy
        if busy or elapsed < idle:
            self._reset_timeout(idle if busy else max(idle - elapsed, 0.05))
            return
        self.app.metrics.protocol_errors.labels("timeout").inc()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(f"421 4.4.2 {self.hostname} Error: timeout exceeded\r\n".encode())  # type: ignore[attr-defined]
        super()._timeout_cb()  # type: ignore[no-untyped-call]

    async def _handle_client(self) -> None:
        if self._proxy_timeout is None:
            if await self.connect_stage():
                await super()._handle_client()
            return
        try:
            await super()._handle_client()
        finally:
            # aiosmtpd closes on a missing or malformed PROXY header without a hook call.
            if self.session is not None and not self.session.proxy_data:
                self.app.metrics.protocol_errors.labels("bad_proxy").inc()

    async def handle_proxy(self, proxy: ProxyData) -> bool:
        """A valid PROXY header from a trusted balancer: the real client is the source address."""
        assert self.session_facts is not None
        if not proxy.valid:
            self.app.metrics.protocol_errors.labels("bad_proxy").inc()
            return False
        if proxy.src_addr is not None:
            ip = ipaddress.ip_address(proxy.src_addr)
            self.session_facts.client_ip = ip
            self.session_facts.client_port = int(proxy.src_port or 0)
            self.session_facts.proxied = True
        return await self.connect_stage()

    async def connect_stage(self) -> bool:
        """Run connect checks before the banner; False when the client was turned away."""
        assert self.session_facts is not None and self.conn is not None
        self.app.start_rdns(self.session_facts)
        decision = await self.conn.policy.connect()
        if decision.reply is not None:
            await self.push(decision.reply.render())
            if self.transport is not None:
                self.transport.close()
            return False
        return True

    # -- replies ------------------------------------------------------------

    async def push(self, status: Any) -> None:
        """Send one reply line; lines of a multi-line reply and replies to pipelined commands go out together.

        aiosmtpd writes (one send() and one TCP segment) per line: seven for
        EHLO, which also confuses scanners that read the reply once. A
        continuation line is held until its final line; a positive final
        reply is held while more pipelined commands are already buffered
        (RFC 2920 §3.1), and everything held goes out before the server waits
        for the client (``_FlushingReader``). Errors and the replies that
        precede TLS or a close are sent at once.
        """
        if isinstance(status, str):
            status = with_enhanced_code(status)
            kind = ERROR_KINDS.get(status[:3])
            if kind is not None and self.conn is not None:
                self.app.metrics.protocol_errors.labels(kind).inc()
                status = await self.conn.count_error(kind) or status
            status = status.encode("utf-8" if self.enable_SMTPUTF8 else "ascii")
        line: bytes = status + b"\r\n"
        self._held.append(line)
        closing = self.conn is not None and self.conn.close_after_reply
        if not closing and self._may_hold(line):
            return
        self._write_held()
        if closing and self.transport is not None:
            self.transport.close()
            return
        await self._writer.drain()

    def _may_hold(self, line: bytes) -> bool:
        if line[3:4] == b"-":
            return True  # a multi-line reply goes out with its last line
        if line[:1] not in (b"2", b"3") or line[:3] in _NEVER_HELD:
            return False
        held = sum(map(len, self._held))
        return (
            held < _HELD_REPLIES_MAX and isinstance(self._reader, _FlushingReader) and self._reader.has_line()
        )

    def _write_held(self) -> None:
        """Write the held replies in one write."""
        if not self._held:
            return
        data = b"".join(self._held)
        self._held.clear()
        if self.transport is not None and not self.transport.is_closing():
            self._writer.write(data)

    def close_if_idle(self) -> None:
        """At shutdown: a connection with no transaction and no command in progress hears 421 and closes."""
        conn, transport = self.conn, self.transport
        if conn is None or conn.txn is not None or conn.busy:
            return
        if transport is not None and not transport.is_closing():
            self._write_held()
            transport.write((SHUTTING_DOWN.render() + "\r\n").encode())  # type: ignore[attr-defined]
            transport.close()

    async def handle_exception(self, error: Exception) -> str:
        """An unexpected exception of ours: 451 4.3.0, logged with the ids."""
        if isinstance(error, TLSSetupException):
            # A failed handshake, already counted and logged: aiosmtpd closes the
            # connection (there is no channel left to send a reply on).
            return "421 4.7.0 TLS handshake failed"
        facts = self.session_facts
        txn = self.conn.txn if self.conn else None
        log.error(
            "internal error (session %s, transaction %s)",
            facts.id if facts else "-",
            txn.id if txn else "-",
            exc_info=error,
        )
        self.app.metrics.protocol_errors.labels("internal").inc()
        if self.conn is not None and self.conn.txn is not None:
            await self.conn.end_transaction("tempfailed", "internal", "internal_error", INTERNAL_ERROR)
            self._set_rset_state()  # type: ignore[no-untyped-call]
        return INTERNAL_ERROR.render()

    def ehlo_lines(self) -> list[str]:
        """The EHLO reply: only extensions we honour end to end."""
        lines = [
            f"250-{self.hostname}",
            "250-PIPELINING",
            f"250-SIZE {self.data_size_limit}",
            "250-8BITMIME",
            "250-SMTPUTF8",
            "250-ENHANCEDSTATUSCODES",
        ]
        if self.app.backend.offers("DSN"):
            lines.append("250-DSN")
        if self.tls_context is not None and self._tls_protocol is None:
            lines.append("250-STARTTLS")
        facts = self.session_facts
        if self.submission and facts is not None and facts.tls is not None and facts.auth_user is None:
            lines.append("250-AUTH PLAIN LOGIN")  # RFC 4954 §4: after TLS only
        lines[-1] = "250 " + lines[-1][4:]
        return lines

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # aiosmtpd parses every address with the email package's RFC 5322 parser
        # (and defines a class per call): a seventh of a short session's CPU. The
        # everyday <local@domain> takes this exact fast path; anything else
        # (quoted local parts, source routes, bare addresses) the full parser.
        m = _SIMPLE_PATH.match(arg)
        if m is not None and ".." not in m.group(1):
            address, rest = m.group(1), m.group(2).lstrip(" \t")
        elif arg.startswith("<>") and (len(arg) == 2 or arg[2] == " "):
            address, rest = "<>", arg[2:]
        else:
            address, rest = super()._getaddr(arg)
        # aiosmtpd answers 555 to parameters it does not know, and upper-cases
        # the ones it passes on; ENVID and ORCPT must reach the backend as
        # written (xtext is case-sensitive). So the DSN parameters are set
        # aside here, in their own case, for the hook to add back (the policy
        # validates them); aiosmtpd sees the rest.
        rest, self.dsn_params = split_dsn(rest)
        return address, rest

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """DATA read in chunks (smtpproxy.dataread) instead of aiosmtpd's line-by-line loop."""
        if await self.check_helo_needed():
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 5.5.1 Error: need RCPT command")
            return
        if arg:
            await self.push("501 5.5.4 Syntax: DATA")
            return
        ticket = self.app.inflight.open(declared_size(self.envelope.mail_options, self.data_size_limit))
        if ticket is None:
            await self.push(NO_STORAGE)
            return
        try:
            await self._data(ticket)
        finally:
            # However DATA ended (client gone too), the bytes are no longer
            # held, except by a delivery still under way (shielded from the
            # client leaving): that one gives them back when it is done.
            task = self.conn.data_task if self.conn is not None else None
            if task is not None and not task.done():
                task.add_done_callback(lambda _: ticket.release())
            else:
                ticket.release()

    async def _data(self, ticket: Ticket) -> None:
        assert self.envelope is not None
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            result = await read_data(
                self._reader,
                size_limit=self.data_size_limit,
                max_line=self.line_length_limit,
                charge=ticket.need,
            )
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            self._writer.close()
            raise asyncio.CancelledError from None
        if result.problem is DataProblem.NO_STORAGE:
            await self.push(NO_STORAGE)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if result.problem is DataProblem.TOO_BIG:
            await self.push("552 5.3.4 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if result.problem is DataProblem.LINE_TOO_LONG:
            await self.push("500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if result.problem is DataProblem.NUL_BYTE:
            # BINARYMIME is not offered: a NUL has no place in the content, and a
            # backend that strips NULs could read "\r\n\0.\r\n" as the end of data.
            await self.push("554 5.6.0 Message contains NUL characters")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = self.envelope.original_content = result.content
        # The handler takes the content from the envelope and lets it go once
        # the message it delivers is built: no reference may stay here.
        del result
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    @syntax("AUTH <mechanism>")
    async def smtp_AUTH(self, arg: str) -> None:
        """The MX port offers no AUTH; the submission port goes to handle_AUTH (the policy decides)."""
        if not self.submission:
            await self.push("502 5.5.1 AUTH not supported")
            return
        await super().smtp_AUTH(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str) -> None:
        """On the submission port, accept the AUTH= parameter (RFC 4954 §5), recorded and not relayed."""
        if self.submission and arg and self.conn is not None:
            found = _AUTH_PARAM.search(arg)
            if found is not None:
                self.conn.mail_auth = found.group(1)
                arg = arg[: found.start()] + arg[found.end() :]
        await super().smtp_MAIL(arg)

    # -- junk commands (session_limits.max_junk_commands) ---------------------

    async def _junk_limit_hit(self) -> bool:
        """Count a command that moves no mail on; True when the session was closed for it."""
        if self.conn is None or self.session_facts is None:
            return False
        decision = self.conn.policy.junk_command()
        if decision.reply is None:
            return False
        self.conn.close_after_reply = True
        await self.push(decision.reply.render())
        return True

    @syntax("NOOP [ignored]")
    async def smtp_NOOP(self, arg: str) -> None:
        if not await self._junk_limit_hit():
            await super().smtp_NOOP(arg)

    @syntax("RSET")
    async def smtp_RSET(self, arg: str) -> None:
        if not await self._junk_limit_hit():
            await super().smtp_RSET(arg)

    @syntax("VRFY <address>")
    async def smtp_VRFY(self, arg: str) -> None:
        if not await self._junk_limit_hit():
            await super().smtp_VRFY(arg)

    async def smtp_EXPN(self, arg: str) -> None:
        if not await self._junk_limit_hit():
            await super().smtp_EXPN(arg)

    @syntax("HELP [command]")
    async def smtp_HELP(self, arg: str) -> None:
        if not await self._junk_limit_hit():
            await super().smtp_HELP(arg)

    def _greeted(self) -> bool:
        return self.session_facts is not None and self.session_facts.helo is not None

    @syntax("HELO hostname")
    async def smtp_HELO(self, hostname: str) -> None:
        # A repeated greeting is junk; the first one after STARTTLS is not
        # (the TLS upgrade forgets the HELO name).
        if self._greeted() and await self._junk_limit_hit():
            return
        await super().smtp_HELO(hostname)

    @syntax("EHLO hostname")
    async def smtp_EHLO(self, hostname: str) -> None:
        if self._greeted() and await self._junk_limit_hit():
            return
        await super().smtp_EHLO(hostname)

    # -- STARTTLS ---------------------------------------------------------------

    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # RFC 3207 §4.2: not again inside TLS (aiosmtpd would nest a second TLS layer).
            await self.push("503 5.5.1 Already running TLS")
            return
        if self.conn is not None and self.conn.txn is not None:
            await self.push("503 5.5.1 STARTTLS not allowed inside a transaction")
            return
        try:
            await super().smtp_STARTTLS(arg)
        except TLSSetupException as err:
            # The connection closes; count why, so a client population stuck on
            # old TLS versions or distrusting our certificate shows up.
            reason = handshake_failure_reason(err.__cause__)
            self.app.metrics.tls_handshake_failures.labels(reason).inc()
            log.info(
                "TLS handshake failed (%s) from %s: %s",
                reason,
                self.session_facts.client_address if self.session_facts else "-",
                err.__cause__,
            )
            raise

    async def _call_handler_hook(self, command: str, *args: Any) -> Any:
        # Marks the connection busy while a hook waits on checks or the backend,
        # so the idle timer measures the client's silence, not ours.
        if self.conn is None:
            return await super()._call_handler_hook(command, *args)
        self.conn.busy = True
        try:
            return await super()._call_handler_hook(command, *args)
        finally:
            self.conn.busy = False
            self._last_activity = self.loop.time()


def split_dsn(params: str | None) -> tuple[str | None, list[str]]:
    """(the MAIL/RCPT parameters without the DSN ones, the DSN ones as written)."""
    if not params:
        return params, []
    kept: list[str] = []
    dsn: list[str] = []
    for word in params.split():
        (dsn if word.partition("=")[0].upper() in DSN_KEYWORDS else kept).append(word)
    return (" ".join(kept) if dsn else params), dsn


def _tls_info(transport: asyncio.BaseTransport) -> TlsInfo | None:
    """What a TLS transport negotiated; None for a plain one."""
    ssl_object = transport.get_extra_info("ssl_object")
    if ssl_object is None:
        return None
    name, _version, bits = ssl_object.cipher() or ("unknown", "", 0)
    return TlsInfo(ssl_object.version() or "TLS", name, int(bits or 0))


# The SMTP verbs InboundSMTP implements (its smtp_* methods), computed once.
SMTP_COMMANDS = tuple(name[len("smtp_") :] for name in dir(InboundSMTP) if name.startswith("smtp_"))


class _HandlerShim:
    """Routes aiosmtpd's hooks to the connection's handler (which exists once connected)."""

    def __init__(self, server: InboundSMTP) -> None:
        self._server = server

    def _conn(self) -> ConnectionHandler:
        assert self._server.conn is not None
        return self._server.conn

    async def handle_PROXY(self, server: Any, session: Any, envelope: Any, proxy_data: ProxyData) -> bool:
        return await self._server.handle_proxy(proxy_data)

    async def handle_HELO(self, server: Any, session: Any, envelope: Any, hostname: str) -> str:
        return await self._conn().handle_HELO(server, session, envelope, hostname)

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        return await self._conn().handle_EHLO(server, session, envelope, hostname, responses)

    async def handle_MAIL(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        options = options + self._server.dsn_params
        return await self._conn().handle_MAIL(server, session, envelope, address, options)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: list[str]
    ) -> str:
        options = options + self._server.dsn_params
        return await self._conn().handle_RCPT(server, session, envelope, address, options)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        return await self._conn().handle_DATA(server, session, envelope)

    async def handle_RSET(self, server: Any, session: Any, envelope: Any) -> str:
        return await self._conn().handle_RSET(server, session, envelope)

    async def handle_QUIT(self, server: Any, session: Any, envelope: Any) -> str:
        return await self._conn().handle_QUIT(server, session, envelope)

    def handle_STARTTLS(self, server: Any, session: Any, envelope: Any) -> bool:
        return True

    async def handle_AUTH(self, server: Any, session: Any, envelope: Any, args: list[str]) -> str | None:
        return await self._conn().handle_AUTH(server, args)
