"""One MTA connection to the milter: the milter driver of the policy core.

The MTA is the backend: it asks about MAIL and RCPT only once it accepted them
itself, so its acceptance is what the policy hears (``mail_here``,
``rcpt_here``), and nothing is relayed by us. At the end of the message the
policy's :class:`~smtpproxy.policy.Delivery` becomes milter replies: the
refusal's exact reply (SMFIR_REPLYCODE), a discard, or the header operations
(:mod:`smtpproxy.milter.edits`), a quarantine (the MTA's hold queue) and
accept. Nothing here decides.

Every reply to one MTA command goes out in one write (no small-write stall).
A bad packet, or one out of order, closes this connection with a log line;
an MTA that aborts or goes away ends the transaction and frees its message.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time

from smtpproxy import replies
from smtpproxy.inflight import Ticket
from smtpproxy.milter import codec
from smtpproxy.milter.codec import Act, MilterProtocolError, Proto
from smtpproxy.milter.context import MilterContext
from smtpproxy.milter.edits import Append, Change, Insert, operations
from smtpproxy.policy import Decision, SessionPolicy
from smtpproxy.session import Session, TlsInfo, new_id
from smtpproxy.verdict import Action, Reply

log = logging.getLogger("smtpproxy.milter")

# What we ask of the MTA: to change the header and to quarantine; the macros we read.
WANTED_ACTIONS = Act.ADDHDRS | Act.CHGHDRS | Act.QUARANTINE | Act.SETSYMLIST
# The header fields, end of header, body chunks and DATA have nothing for the
# policy to answer (it decides on the whole message): a round trip less each.
# SKIP is for MTAs that do not offer NR_BODY: past the size limit, skip the rest.
WANTED_PROTOCOL = (
    Proto.NR_HDR
    | Proto.NR_EOH
    | Proto.NR_BODY
    | Proto.NODATA
    | Proto.NR_DATA
    | Proto.HDR_LEADSPC
    | Proto.SKIP
)
MACROS = {
    codec.Stage.CONNECT: "j {daemon_name} {daemon_addr} {daemon_port} {client_addr} {client_name} {client_port}",
    codec.Stage.HELO: "{tls_version} {cipher} {cipher_bits}",
    codec.Stage.MAIL: "i {auth_authen} {mail_addr}",
    codec.Stage.RCPT: "i {rcpt_addr}",
    codec.Stage.EOH: "i",
    codec.Stage.EOM: "i",
}
# The "no reply" flag of each event that has one.
_NO_REPLY = {
    "C": Proto.NR_CONN,
    "H": Proto.NR_HELO,
    "M": Proto.NR_MAIL,
    "R": Proto.NR_RCPT,
    "T": Proto.NR_DATA,
    "U": Proto.NR_UNKN,
    "N": Proto.NR_EOH,
    "L": Proto.NR_HDR,
    "B": Proto.NR_BODY,
}
PROGRESS_INTERVAL = 10.0  # seconds: a slow end-of-message check keeps the MTA's timer from firing
READ_SIZE = 65536
TOO_BIG = Reply(552, "5.3.4", "Error: Too much mail data")  # the proxy's words (server.py)
NO_STORAGE = Reply(452, "4.3.1", "Insufficient system storage, try again later")  # limits.max_inflight_bytes


class _OutOfOrder(MilterProtocolError):
    def __init__(self, message: str) -> None:
        super().__init__("out_of_order", message)


class MilterConnection:
    """The state of one MTA connection: negotiated options, macros, the policy, the message so far."""

    def __init__(
        self, app: MilterContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.app = app
        self.reader = reader
        self.writer = writer
        self.negotiated = False
        self.actions = Act(0)
        self.protocol = Proto(0)
        self.macros: dict[str, str] = {}
        self.policy: SessionPolicy | None = None
        self.in_mail = False  # a MAIL was sent and the message has not ended
        self.in_body = False
        self.fields: list[tuple[bytes, bytes]] = []
        self.body = bytearray()
        self.size = 0
        self.too_big = False
        self.no_storage = False  # past the budget of message bytes in flight (limits.max_inflight_bytes)
        self.ticket: Ticket | None = None
        self.busy = False  # a command is being answered: a drain waits for it
        self.closing = False
        sock = writer.get_extra_info("socket")
        self._quickack: socket.socket | None = None
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if hasattr(socket, "TCP_QUICKACK"):
                self._quickack = sock

    @property
    def idle(self) -> bool:
        """Between transactions (a drain may close it now)."""
        return not self.busy and not self.in_mail

    # -- the read loop ------------------------------------------------------------------

    async def serve(self) -> None:
        """Read, decode and answer until the MTA quits or goes away, or a packet is bad."""
        decoder = codec.Decoder()
        try:
            while not self.closing:
                data = await self.reader.read(READ_SIZE)
                if not data:
                    break
                if self._quickack is not None:
                    # Packets we do not answer (macros, header fields) would otherwise
                    # be ACKed only after the delayed-ACK timer (40 ms on Linux), and
                    # the MTA, writing small packets with Nagle on, waits for that ACK.
                    self._quickack.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
                decoder.feed(data)
                for command in decoder.commands():
                    self.busy = True
                    out = await self.handle(command)
                    self.busy = False
                    if out:
                        self.writer.write(out)
                    if self.closing:
                        break
        except MilterProtocolError as err:
            self.app.metrics.milter_protocol_errors.labels(err.kind).inc()
            peer = self.writer.get_extra_info("peername")
            log.warning(
                "milter connection closed: %s", err, extra={"fields": {"kind": err.kind, "peer": str(peer)}}
            )
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.busy = False
            await self.finish("disconnect", "mta_lost")

    async def finish(self, stage: str, reason: str) -> None:
        """The connection is over, however it ended: the transaction ends, the checks release."""
        await self._end_session(stage, reason)
        if not self.writer.is_closing():
            self.writer.close()

    async def _end_session(self, stage: str, reason: str) -> None:
        policy, self.policy = self.policy, None
        self._reset_message()
        if policy is None:
            return
        policy.end("aborted", stage, reason)
        try:
            await policy.disconnect()
        except Exception:
            log.exception("disconnect checks failed (session %s)", policy.session.id)
        self.app.logs.connection_closed(policy.session)

    def _reset_message(self) -> None:
        self.in_mail = self.in_body = self.too_big = self.no_storage = False
        self.fields, self.body, self.size = [], bytearray(), 0
        ticket, self.ticket = self.ticket, None
        if ticket is not None:
            ticket.release()

    # -- one command ---------------------------------------------------------------------

    def _answer(self, code: str, reply: bytes) -> bytes:
        """``reply``, unless the MTA agreed this event gets none."""
        flag = _NO_REPLY.get(code)
        return b"" if flag is not None and flag in self.protocol else reply

    async def handle(self, command: codec.Command) -> bytes:
        """The bytes to send for one command (possibly none)."""
        if isinstance(command, codec.OptNeg):
            return self._negotiate(command)
        if not self.negotiated:
            raise _OutOfOrder(f"{type(command).__name__} before option negotiation")
        if isinstance(command, codec.Macros):
            self.macros.update(command.values)
            return b""
        if isinstance(command, codec.Connect):
            return await self._connect(command)
        if isinstance(command, codec.Simple) and command.code in (codec.QUIT, codec.QUIT_NC):
            await self._end_session("quit", "client_quit")
            self.macros.clear()
            self.closing = command.code == codec.QUIT
            return b""
        policy = self.policy
        if policy is None:
            raise _OutOfOrder(f"{type(command).__name__} before connect")
        if isinstance(command, codec.Helo):
            return await self._helo(policy, command)
        if isinstance(command, codec.Mail):
            return await self._mail(policy, command)
        if isinstance(command, codec.Unknown):
            return self._answer("U", await self._decided(policy.command_error("invalid_command")))
        if isinstance(command, codec.Simple) and command.code == codec.ABORT:
            policy.end("aborted", "data" if self.in_body or self.fields else "rcpt", "mta_abort")
            self._reset_message()
            return b""
        if not self.in_mail:
            raise _OutOfOrder(f"{type(command).__name__} outside a transaction")
        if isinstance(command, codec.Rcpt):
            if self.fields or self.in_body:
                raise _OutOfOrder("RCPT after the message began")
            return self._answer("R", await self._decided(await policy.rcpt_here(*_args(command))))
        if isinstance(command, codec.Simple):  # DATA or end of header
            if command.code == codec.EOH:
                self.in_body = True
            return self._answer(command.code, codec.CONTINUE)
        if isinstance(command, codec.Header):
            if self.in_body:
                raise _OutOfOrder("a header field after the body began")
            self._count(len(command.name) + len(command.value) + 3)
            if not self.dropping:
                self.fields.append((command.name, command.value))
            return self._answer("L", codec.CONTINUE)
        if isinstance(command, codec.Body):
            self.in_body = True
            return self._body(command.chunk)
        assert isinstance(command, codec.EndOfMessage)
        self._body(command.chunk)
        if self.dropping:
            # The proxy's replies for the same message (its DATA reader's limits).
            reply, word, reason = (
                (TOO_BIG, "rejected", "size") if self.too_big else (NO_STORAGE, "tempfailed", "no_storage")
            )
            policy.end(word, "data", reason, reply)
            self._reset_message()
            return codec.encode_replycode([reply.render()])
        return await self._end_of_message(policy)

    def _negotiate(self, command: codec.OptNeg) -> bytes:
        if self.negotiated:
            raise _OutOfOrder("a second option negotiation")
        if command.version < 2:
            raise MilterProtocolError("malformed", f"milter protocol version {command.version} (we speak 6)")
        self.negotiated = True
        self.actions = WANTED_ACTIONS & Act(command.actions & 0x1FF)
        self.protocol = WANTED_PROTOCOL & Proto(command.protocol & 0x1FFFFF)
        macros = MACROS if Act.SETSYMLIST in self.actions else None
        return codec.encode_optneg(self.actions, self.protocol, macros)

    async def _decided(self, decision: Decision) -> bytes:
        """A policy decision as the milter reply: continue, or the policy's own reply."""
        if decision.delay > 0:
            await asyncio.sleep(decision.delay)  # the tarpit: the MTA's client waits as it would for us
        if decision.reply is None:
            return codec.CONTINUE
        return codec.encode_replycode(decision.reply.render().split("\r\n"))

    async def _connect(self, command: codec.Connect) -> bytes:
        if self.policy is not None:
            raise _OutOfOrder("a second connect")
        self.policy = policy = self.app.milter_policy.session(self._session(command))
        self.app.logs.connection_open(policy.session)
        return self._answer("C", await self._decided(await policy.connect()))

    def _session(self, command: codec.Connect) -> Session:
        """The client's facts, as the MTA saw them (its verified name is our rDNS: no lookup of ours)."""
        ip: ipaddress.IPv4Address | ipaddress.IPv6Address
        try:
            ip = ipaddress.ip_address(command.address.removeprefix("IPv6:").strip("[]"))
        except ValueError:
            # A local submission (non_smtpd_milters) has no network peer.
            ip = ipaddress.IPv4Address("127.0.0.1")
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        m = self.macros
        port = int(m["daemon_port"]) if m.get("daemon_port", "").isdigit() else 0
        session = Session(new_id(), ip, command.port, m.get("daemon_addr", ""), port)
        name = command.hostname
        if name and name != "unknown" and not name.startswith("["):
            session.rdns = name.lower().rstrip(".")
        return session

    async def _helo(self, policy: SessionPolicy, command: codec.Helo) -> bytes:
        if policy.txn is not None:
            policy.end("aborted", "helo", "helo_reset")
        version = self.macros.get("tls_version")
        if version:
            bits = self.macros.get("cipher_bits", "0")
            policy.session.tls = TlsInfo(
                version, self.macros.get("cipher", ""), int(bits) if bits.isdigit() else 0
            )
        return self._answer("H", await self._decided(await policy.helo(command.name, esmtp=True)))

    async def _mail(self, policy: SessionPolicy, command: codec.Mail) -> bytes:
        if policy.txn is not None:
            policy.end("aborted", "mail", "unfinished")
        self._reset_message()
        if self.app.draining:
            self.closing = True
            return self._answer("M", codec.encode_replycode([replies.SHUTTING_DOWN.render()]))
        decision = await policy.mail_here(*_args(command))
        self.in_mail = decision.forward
        return self._answer("M", await self._decided(decision))

    @property
    def dropping(self) -> bool:
        """Nothing more of this message is kept: it is refused at its end."""
        return self.too_big or self.no_storage

    def _count(self, n: int) -> None:
        """Count ``n`` more bytes of the message against the size limit and the in-flight budget."""
        self.size += n
        if self.dropping:
            return
        if self.ticket is None:
            self.ticket = self.app.inflight.open(0)
        if self.size > self.app.config.limits.max_message_size:
            self.too_big = True
        elif self.ticket is None or not self.ticket.need(self.size):
            self.no_storage = True
        if self.dropping:
            self.fields, self.body = [], bytearray()  # nothing more is kept of it
            if self.ticket is not None:
                self.ticket.release()

    def _body(self, chunk: bytes) -> bytes:
        """Keep a chunk (nothing more past the size limit: the end of message says 552)."""
        self._count(len(chunk))
        if not self.dropping:
            self.body += chunk
            return self._answer("B", codec.CONTINUE)
        return self._answer("B", codec.SKIP if Proto.SKIP in self.protocol else codec.CONTINUE)

    async def _end_of_message(self, policy: SessionPolicy) -> bytes:
        txn = policy.txn
        if txn is None or not txn.recipients:
            self._reset_message()
            reply = replies.NEED_MAIL if txn is None else replies.NO_VALID_RECIPIENTS
            return codec.encode_replycode([reply.render()])
        lead = Proto.HDR_LEADSPC in self.protocol
        header = b"".join(
            n + (b":" if lead else b": ") + v.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n") + b"\r\n"
            for n, v in self.fields
        )
        message = header + b"\r\n" + bytes(self.body)
        fields = self.fields
        ticket, self.ticket = self.ticket, None  # held until the policy is done with the message
        self._reset_message()
        started = time.perf_counter()
        task = asyncio.ensure_future(policy.data(message))
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=PROGRESS_INTERVAL)
                if done:
                    break
                self.writer.write(codec.PROGRESS)
            delivery = task.result()
        finally:
            if not task.done():
                task.cancel()
            if ticket is not None:
                ticket.release()
            self.app.metrics.data_duration.observe(time.perf_counter() - started)
        if delivery.message is None:
            assert delivery.reply is not None
            policy.refused(delivery)
            if delivery.action is Action.DISCARD:
                return codec.DISCARD
            return codec.encode_replycode(delivery.reply.render().split("\r\n"))
        out = bytearray()
        for op in operations(fields, delivery.header_edits, policy.policy.forged_ar, leading_space=lead):
            if isinstance(op, Insert) and Act.ADDHDRS in self.actions:
                out += codec.encode_insert_header(op.index, op.name, op.value)
            elif isinstance(op, Append) and Act.ADDHDRS in self.actions:
                out += codec.encode_add_header(op.name, op.value)
            elif isinstance(op, Change) and Act.CHGHDRS in self.actions:
                out += codec.encode_change_header(op.index, op.name, op.value)
        if delivery.action is Action.QUARANTINE and Act.QUARANTINE in self.actions:
            out += codec.encode_quarantine(delivery.reason)
        out += codec.ACCEPT
        queue_id = self.macros.get("i", "")
        policy.delivered(delivery, Reply(250, "2.0.0", f"Ok: handed back to the MTA {queue_id}".rstrip()))
        return bytes(out)


def _args(command: codec.Mail | codec.Rcpt) -> tuple[str, tuple[str, ...]]:
    """The address without angle brackets ("" for the null sender) and the parameters."""
    address = command.address.strip()
    if address.startswith("<") and address.endswith(">"):
        address = address[1:-1]
    return address, command.params
