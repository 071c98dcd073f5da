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
from typing import TYPE_CHECKING, Any

from aiosmtpd.proxy_protocol import ProxyData
from aiosmtpd.smtp import SMTP, TLSSetupException, login_always_fail, syntax

from smtpproxy.dataread import DataProblem, read_data
from smtpproxy.handler import ConnectionHandler
from smtpproxy.policy.dsn import KEYWORDS as DSN_KEYWORDS
from smtpproxy.replies import ERROR_KINDS, INTERNAL_ERROR, with_enhanced_code
from smtpproxy.session import Session, TlsInfo, new_id
from smtpproxy.tls import handshake_failure_reason

if TYPE_CHECKING:
    from smtpproxy.app import App

log = logging.getLogger("smtpproxy.server")

_SIMPLE_PATH = re.compile(
    r"^<((?![.])[A-Za-z0-9!#$%&'*+/=?^_`{|}~.\-\u0080-\U0010ffff]+(?<![.])@[A-Za-z0-9\-\u0080-\U0010ffff]+"
    r"(?:\.[A-Za-z0-9\-\u0080-\U0010ffff]+)*)>(.*)$",
    re.DOTALL,
)

_HOOKS = ("PROXY", "HELO", "EHLO", "MAIL", "RCPT", "DATA", "RSET", "QUIT", "STARTTLS")


class InboundSMTP(SMTP):
    """One client connection (aiosmtpd creates one protocol object per connection)."""

    def __init__(self, app: App) -> None:
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
        asyncio.StreamReaderProtocol.__init__(
            self,
            asyncio.StreamReader(loop=loop, limit=self.line_length_limit),
            client_connected_cb=self._cb_client_connected,
            loop=loop,
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
        self.tls_context = app.tls_context
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
        self._auth_require_tls = True
        self._proxy_timeout = None
        self._authenticator = None
        self._auth_callback = login_always_fail
        self._auth_required = False
        self._auth_methods = {}  # an MX offers no AUTH
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
        self.conn = ConnectionHandler(self.app, self.session_facts)
        self._proxy_timeout = self.app.proxy_timeout_for(ip)
        if not self.app.admit(self):
            self.session_facts = None
            transport.write(b"421 4.7.0 Too many connections, please try again later\r\n")  # type: ignore[attr-defined]
            transport.close()
            self.app.metrics.connections_rejected.labels("max_connections").inc()
            return
        super().connection_made(transport)
        self.app.logs.connection_open(self.session_facts)

    def _after_starttls(self, transport: asyncio.BaseTransport) -> None:
        assert self.session_facts is not None
        ssl_object = transport.get_extra_info("ssl_object")
        if ssl_object is not None:
            name, _version, bits = ssl_object.cipher() or ("unknown", "", 0)
            self.session_facts.tls = TlsInfo(ssl_object.version() or "TLS", name, int(bits or 0))
        # RFC 3207 §4.2: forget what the client said before TLS.
        self.session_facts.helo = None
        self.session_facts.esmtp = False
        self.session_facts.dsn_offered = False

    def connection_lost(self, error: Exception | None) -> None:
        facts = self.session_facts
        if facts is None:
            return  # refused before it started
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
        if isinstance(status, str):
            status = with_enhanced_code(status)
            kind = ERROR_KINDS.get(status[:3])
            if kind is not None and self.conn is not None:
                self.app.metrics.protocol_errors.labels(kind).inc()
                status = await self.conn.count_error(kind) or status
        await super().push(status)
        if self.conn is not None and self.conn.close_after_reply and self.transport is not None:
            self.transport.close()

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
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        try:
            result = await read_data(
                self._reader, size_limit=self.data_size_limit, max_line=self.line_length_limit
            )
        except (asyncio.CancelledError, asyncio.IncompleteReadError, ConnectionError):
            self._writer.close()
            raise asyncio.CancelledError from None
        if result.problem is DataProblem.TOO_BIG:
            await self.push("552 5.3.4 Error: Too much mail data")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        if result.problem is DataProblem.LINE_TOO_LONG:
            await self.push("500 5.5.2 Line too long (see RFC5321 4.5.3.1.6)")
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return
        self.envelope.content = result.content
        self.envelope.original_content = result.content
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        await self.push(status)

    async def smtp_AUTH(self, arg: str) -> None:
        """We are an MX: no submission, no AUTH."""
        await self.push("502 5.5.1 AUTH not supported")

    async def smtp_STARTTLS(self, arg: str) -> None:
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
