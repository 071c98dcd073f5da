"""The milter protocol, version 6, as pure data: bytes in, commands out; replies in, bytes out.

Sans-I/O in the manner of h11: :class:`Decoder` is fed whatever the socket
read (``feed``) and yields whole :class:`Command` values, however the bytes
were split; the ``encode_*`` functions build the filter's replies. Nothing here
touches a socket or decides anything.

A packet is a 32-bit big-endian length (counting the command byte), one command
byte and its data. The length is capped (:data:`MAX_PACKET`): Postfix sends body
chunks of at most 64 KiB and one header field per packet (``header_size_limit``
is 100 KiB by default), so a longer packet is an MTA we cannot serve, or not an
MTA at all. Every malformation raises :class:`MilterProtocolError`, whose
``kind`` is a metric label (the connection is closed, the process lives on).

Written here rather than taken from ``kilter.protocol`` (status "planning",
0.x, its own buffer protocol and no length cap) or the PyPI ``miltertest``
(GPLv3, the MTA side, untyped): the subset a filter needs is small. The
``miltertest`` package is the independent client of our tests.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass

VERSION = 6
MAX_PACKET = 256 * 1024

_LEN = struct.Struct(">I")
_OPTNEG = struct.Struct(">III")


class Act(enum.IntFlag):
    """SMFIF_*: the actions a filter may take at end of message."""

    ADDHDRS = 0x01
    CHGBODY = 0x02
    ADDRCPT = 0x04
    DELRCPT = 0x08
    CHGHDRS = 0x10
    QUARANTINE = 0x20
    CHGFROM = 0x40
    ADDRCPT_PAR = 0x80
    SETSYMLIST = 0x100


class Proto(enum.IntFlag):
    """SMFIP_*: events the MTA may leave out, and events the filter does not answer."""

    NOCONNECT = 0x1
    NOHELO = 0x2
    NOMAIL = 0x4
    NORCPT = 0x8
    NOBODY = 0x10
    NOHDRS = 0x20
    NOEOH = 0x40
    NR_HDR = 0x80
    NOUNKNOWN = 0x100
    NODATA = 0x200
    SKIP = 0x400
    RCPT_REJ = 0x800
    NR_CONN = 0x1000
    NR_HELO = 0x2000
    NR_MAIL = 0x4000
    NR_RCPT = 0x8000
    NR_DATA = 0x10000
    NR_UNKN = 0x20000
    NR_EOH = 0x40000
    NR_BODY = 0x80000
    HDR_LEADSPC = 0x100000


class Stage(enum.IntEnum):
    """SMFIM_*: where a macro list of SMFIR_SETSYMLIST applies."""

    CONNECT = 0
    HELO = 1
    MAIL = 2
    RCPT = 3
    DATA = 4
    EOM = 5
    EOH = 6


class MilterProtocolError(Exception):
    """The MTA sent something we cannot read; ``kind``: malformed, oversized, out_of_order, unknown."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


# -- commands (MTA to filter) -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OptNeg:
    """SMFIC_OPTNEG: the MTA's version, the actions it allows, the protocol steps it offers."""

    version: int
    actions: int
    protocol: int


@dataclass(frozen=True, slots=True)
class Macros:
    """SMFIC_MACRO: macro values for the command ``for_command`` that follows."""

    for_command: str
    values: dict[str, str]


@dataclass(frozen=True, slots=True)
class Connect:
    """SMFIC_CONNECT: ``family`` is 4, 6, L (unix socket) or U (unknown; no port, no address)."""

    hostname: str
    family: str
    port: int
    address: str


@dataclass(frozen=True, slots=True)
class Helo:
    """SMFIC_HELO."""

    name: str


@dataclass(frozen=True, slots=True)
class Mail:
    """SMFIC_MAIL: the address as sent (in angle brackets) and the ESMTP parameters."""

    address: str
    params: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Rcpt:
    """SMFIC_RCPT."""

    address: str
    params: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Header:
    """SMFIC_HEADER: one field; the value as the MTA keeps it (folded with LF)."""

    name: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Body:
    """SMFIC_BODY: one chunk of the body (CRLF line ends)."""

    chunk: bytes


@dataclass(frozen=True, slots=True)
class EndOfMessage:
    """SMFIC_BODYEOB: the end of the message (with a last chunk, usually empty)."""

    chunk: bytes


@dataclass(frozen=True, slots=True)
class Unknown:
    """SMFIC_UNKNOWN: an SMTP command the MTA did not know."""

    line: str


@dataclass(frozen=True, slots=True)
class Simple:
    """A command without data: D(ata), N (end of header), A(bort), Q(uit), K (quit, new connection)."""

    code: str


Command = OptNeg | Macros | Connect | Helo | Mail | Rcpt | Header | Body | EndOfMessage | Unknown | Simple

DATA, EOH, ABORT, QUIT, QUIT_NC = "T", "N", "A", "Q", "K"


def _strings(data: bytes, what: str) -> list[bytes]:
    """NUL-terminated strings; the last one must be terminated."""
    if not data.endswith(b"\0"):
        raise MilterProtocolError("malformed", f"{what}: a string is not NUL-terminated")
    return data[:-1].split(b"\0")


def _text(value: bytes) -> str:
    return value.decode("utf-8", "surrogateescape")


def _decode_args(data: bytes, what: str) -> tuple[str, tuple[str, ...]]:
    parts = _strings(data, what)
    return _text(parts[0]), tuple(_text(p) for p in parts[1:] if p)


def _decode_connect(data: bytes) -> Connect:
    end = data.find(b"\0")
    if end < 0 or end + 1 >= len(data):
        raise MilterProtocolError("malformed", "connect: no host name or family")
    hostname, family = _text(data[:end]), chr(data[end + 1])
    if family == "U":
        return Connect(hostname, family, 0, "")
    if family not in "46L" or len(data) < end + 4:
        raise MilterProtocolError("malformed", f"connect: bad family {family!r}")
    (port,) = struct.unpack_from(">H", data, end + 2)
    address = _strings(data[end + 4 :], "connect")
    if len(address) != 1:
        raise MilterProtocolError("malformed", "connect: trailing data after the address")
    return Connect(hostname, family, port, _text(address[0]))


def decode(code: str, data: bytes) -> Command:
    """One packet's command, or MilterProtocolError."""
    if code == "O":
        if len(data) < _OPTNEG.size:
            raise MilterProtocolError("malformed", "optneg: shorter than 12 bytes")
        return OptNeg(*_OPTNEG.unpack_from(data))
    if code == "D":
        if not data:
            raise MilterProtocolError("malformed", "macro: no command code")
        pairs = _strings(data[1:], "macro") if len(data) > 1 else []
        if len(pairs) % 2:
            raise MilterProtocolError("malformed", "macro: a name without a value")
        names = [_text(n).strip("{}") for n in pairs[0::2]]
        return Macros(chr(data[0]), dict(zip(names, (_text(v) for v in pairs[1::2]), strict=True)))
    if code == "C":
        return _decode_connect(data)
    if code == "H":
        return Helo(_text(_strings(data, "helo")[0]))
    if code in "MR":
        address, params = _decode_args(data, "mail" if code == "M" else "rcpt")
        return Mail(address, params) if code == "M" else Rcpt(address, params)
    if code == "L":
        parts = _strings(data, "header")
        if len(parts) != 2:
            raise MilterProtocolError("malformed", "header: expected a name and a value")
        return Header(parts[0], parts[1])
    if code == "B":
        return Body(data)
    if code == "E":
        return EndOfMessage(data)
    if code == "U":
        return Unknown(_text(data.rstrip(b"\0")))
    if code in (DATA, EOH, ABORT, QUIT, QUIT_NC):
        return Simple(code)
    raise MilterProtocolError("unknown", f"unknown command {code!r}")


class Decoder:
    """Packets out of a byte stream: ``feed(data)`` then iterate ``commands()``.

    State is kept across reads: a packet split anywhere (inside the length
    prefix too) comes out whole once its last byte arrived.
    """

    def __init__(self, max_packet: int = MAX_PACKET) -> None:
        self.max_packet = max_packet
        self._buffer = bytearray()

    @property
    def pending(self) -> int:
        """Bytes received that do not make a whole packet yet."""
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        """Bytes just read from the MTA."""
        self._buffer += data

    def commands(self) -> Iterator[Command]:
        """The whole packets received so far, in order; raises on the first bad one."""
        buf = self._buffer
        pos = 0
        try:
            while len(buf) - pos >= 4:
                (length,) = _LEN.unpack_from(buf, pos)
                if length == 0:
                    raise MilterProtocolError("malformed", "a packet of length 0")
                if length > self.max_packet:
                    raise MilterProtocolError(
                        "oversized", f"a packet of {length} bytes (at most {self.max_packet})"
                    )
                if len(buf) - pos - 4 < length:
                    break
                code = chr(buf[pos + 4])
                data = bytes(buf[pos + 5 : pos + 4 + length])
                pos += 4 + length
                yield decode(code, data)
        finally:
            del buf[:pos]


# -- replies (filter to MTA) -------------------------------------------------------------


def packet(code: str, data: bytes = b"") -> bytes:
    """One packet: length, command byte, data."""
    return _LEN.pack(len(data) + 1) + code.encode("ascii") + data


CONTINUE = packet("c")
ACCEPT = packet("a")
REJECT = packet("r")
TEMPFAIL = packet("t")
DISCARD = packet("d")
SKIP = packet("s")
PROGRESS = packet("p")


def _z(value: str) -> bytes:
    """A NUL-terminated string; a NUL inside would end it early, so none may be there."""
    return value.replace("\0", "").encode("utf-8", "surrogateescape") + b"\0"


def encode_optneg(actions: int, protocol: int, macros: dict[Stage, str] | None = None) -> bytes:
    """Our answer to SMFIC_OPTNEG, with the macro lists we want per stage (SMFIR_SETSYMLIST)."""
    data = _OPTNEG.pack(VERSION, actions, protocol)
    for stage, names in (macros or {}).items():
        data += _LEN.pack(stage) + _z(names)
    return packet("O", data)


def encode_replycode(lines: list[str]) -> bytes:
    """SMFIR_REPLYCODE: an SMTP reply, its lines already rendered (``550 5.7.1 text``), CRLF between."""
    text = "\r\n".join(line.replace("\r", " ").replace("\n", " ") for line in lines)
    return packet("y", _z(text))


def encode_add_header(name: str, value: str) -> bytes:
    """SMFIR_ADDHEADER: a field at the end of the header."""
    return packet("h", _z(name) + _z(value))


def encode_insert_header(index: int, name: str, value: str) -> bytes:
    """SMFIR_INSHEADER: a field at position ``index`` (0: at the top)."""
    return packet("i", _LEN.pack(index) + _z(name) + _z(value))


def encode_change_header(index: int, name: str, value: str) -> bytes:
    """SMFIR_CHGHEADER: the ``index``-th (from 1) field named ``name``; an empty value deletes it."""
    return packet("m", _LEN.pack(index) + _z(name) + _z(value))


def encode_quarantine(reason: str) -> bytes:
    """SMFIR_QUARANTINE: the MTA puts the message on hold, with ``reason``."""
    return packet("q", _z(reason or "quarantine"))
