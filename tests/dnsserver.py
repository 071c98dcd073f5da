"""A small authoritative DNS server for tests, built on dnslib.

``DnsServer`` serves zone data from a dict on 127.0.0.1 over UDP and TCP on the
same ephemeral port, in background threads, so sync and async tests can use it::

    with DnsServer({"example.org": [("TXT", "v=spf1 -all"), ("A", "192.0.2.1")]}) as dns:
        resolver = Resolver([dns.address], timeout=2.0)

Zone data: lower-case owner name (no trailing dot) -> list of ``(rdtype, rdata)``,
or one of the special strings:

- ``"TIMEOUT"``: the name never answers (UDP or TCP);
- ``"SERVFAIL"``: answers SERVFAIL;
- ``"TRUNCATE"``: answers with TC set over UDP and NODATA over TCP.

A record list may also hold the pseudo records ``("TRUNCATE", "")``: TC over UDP,
the full answer over TCP; and ``("TIMEOUT", "")``: queries for types not listed
never answer (the listed types answer normally). UDP answers larger than 512 bytes (or the client's
EDNS buffer size) are truncated like a real server would.

TXT rdata may be a ``str`` (encoded as UTF-8 and split into 255-byte strings),
``bytes`` (split likewise: for invalid UTF-8 tests), or a list/tuple of ``str``/``bytes``
(the exact character-strings of one record). Other types: A, AAAA, MX ("10 host"),
PTR, CNAME, NS, SPF (like TXT), and anything dnslib parses in zone-file syntax
(SOA, SRV, ...). Owner names may start with ``*.`` (wildcards). Queries are
case-insensitive; names absent -> NXDOMAIN (with an SOA for negative caching);
present name, other type -> NOERROR/NODATA. CNAMEs are followed inside the zone.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from dnslib import AAAA, CNAME, MX, NS, PTR, QTYPE, RCODE, RR, SOA, TXT, A, DNSLabel, DNSRecord
from dnslib.dns import EDNS0

RecordData = str | bytes | Sequence[str | bytes]
ZoneValue = list[tuple[str, Any]] | str
SPECIALS = ("TIMEOUT", "SERVFAIL", "TRUNCATE")
MAX_CNAME_HOPS = 8
UDP_LIMIT = 512


def _txt_strings(data: RecordData) -> list[bytes]:
    """The character-strings of one TXT record, each at most 255 bytes."""
    if isinstance(data, str | bytes):
        raw = data.encode("utf-8") if isinstance(data, str) else data
        return [raw[i : i + 255] for i in range(0, len(raw), 255)] or [b""]
    return [part.encode("utf-8") if isinstance(part, str) else part for part in data]


def _rdata(rdtype: str, data: RecordData, owner: str, ttl: int) -> RR:
    """Build one resource record from the zone dict's (rdtype, rdata) form."""
    kind = rdtype.upper()
    if kind in ("TXT", "SPF"):
        return RR(owner, getattr(QTYPE, kind), rdata=TXT(_txt_strings(data)), ttl=ttl)
    assert isinstance(data, str), f"{owner} {kind}: rdata must be text"
    simple: dict[str, Any] = {"A": A, "AAAA": AAAA, "PTR": PTR, "CNAME": CNAME, "NS": NS}
    if kind in simple:
        return RR(owner, getattr(QTYPE, kind), rdata=simple[kind](data), ttl=ttl)
    if kind == "MX":
        pref, _, host = data.partition(" ")
        return RR(owner, QTYPE.MX, rdata=MX(host.strip(), int(pref)), ttl=ttl)
    # Anything else in zone-file syntax (SOA, SRV, CAA ...).
    parsed: RR = RR.fromZone(f"{owner}. {ttl} IN {kind} {data}")[0]
    return parsed


class DnsServer:
    """Serves zone data on 127.0.0.1 over UDP and TCP (same port)."""

    def __init__(self, records: dict[str, ZoneValue] | None = None, ttl: int = 300) -> None:
        self.host = "127.0.0.1"
        self.port = 0
        self.ttl = ttl
        self.queries: list[tuple[str, str]] = []
        self._records: dict[str, ZoneValue] = {}
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._udp: socket.socket | None = None
        self._tcp: socket.socket | None = None
        self._conns: set[socket.socket] = set()
        for name, value in (records or {}).items():
            self.set(name, value)

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, the form Resolver takes for nameservers."""
        return f"{self.host}:{self.port}"

    # Zone data -----------------------------------------------------------------

    def set(self, name: str, value: ZoneValue) -> None:
        """Replace the data of ``name`` (thread-safe; takes effect for the next query)."""
        if isinstance(value, str) and value not in SPECIALS:
            raise ValueError(f"{name}: special value must be one of {SPECIALS}, got {value!r}")
        with self._lock:
            self._records[name.lower().rstrip(".")] = value if isinstance(value, str) else list(value)

    def remove(self, name: str) -> None:
        """Delete ``name`` from the zone (it answers NXDOMAIN afterwards)."""
        with self._lock:
            self._records.pop(name.lower().rstrip("."), None)

    def count(self, name: str, rdtype: str | None = None) -> int:
        """How many queries for ``name`` (and ``rdtype``, when given) arrived."""
        key = name.lower().rstrip(".")
        with self._lock:
            return sum(1 for n, t in self.queries if n == key and (rdtype is None or t == rdtype))

    # Lifecycle -----------------------------------------------------------------

    def start(self) -> None:
        """Bind UDP and TCP on one free port and serve in background threads."""
        for _ in range(50):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind((self.host, 0))
            port = udp.getsockname()[1]
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            try:
                tcp.bind((self.host, port))
            except OSError:
                udp.close()
                tcp.close()
                continue
            tcp.listen(16)
            break
        else:
            raise RuntimeError("DnsServer: no port free for both UDP and TCP after 50 tries")
        udp.settimeout(0.05)
        tcp.settimeout(0.05)
        self._udp, self._tcp, self.port = udp, tcp, port
        self._stopping.clear()
        for target in (self._serve_udp, self._serve_tcp):
            t = threading.Thread(target=target, name=f"dnsserver-{target.__name__}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        """Stop serving and close every socket."""
        self._stopping.set()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()
        with self._lock:
            conns = list(self._conns)
        for sock in [self._udp, self._tcp, *conns]:
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._udp = self._tcp = None

    def __enter__(self) -> DnsServer:
        self.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    # Serving -------------------------------------------------------------------

    def _serve_udp(self) -> None:
        assert self._udp is not None
        sock = self._udp
        while not self._stopping.is_set():
            try:
                data, peer = sock.recvfrom(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            answer = self.handle(data, tcp=False)
            if answer is not None:
                with contextlib.suppress(OSError):
                    sock.sendto(answer, peer)

    def _serve_tcp(self) -> None:
        assert self._tcp is not None
        while not self._stopping.is_set():
            try:
                conn, _ = self._tcp.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._conns.add(conn)
            t = threading.Thread(target=self._serve_conn, args=(conn,), daemon=True)
            t.start()

    def _serve_conn(self, conn: socket.socket) -> None:
        conn.settimeout(0.05)
        buf = b""
        try:
            while not self._stopping.is_set():
                try:
                    chunk = conn.recv(65535)
                except TimeoutError:
                    continue
                if not chunk:
                    return
                buf += chunk
                while len(buf) >= 2 and len(buf) >= 2 + struct.unpack("!H", buf[:2])[0]:
                    size = struct.unpack("!H", buf[:2])[0]
                    message, buf = buf[2 : 2 + size], buf[2 + size :]
                    answer = self.handle(message, tcp=True)
                    if answer is not None:
                        conn.sendall(struct.pack("!H", len(answer)) + answer)
        except OSError:
            return
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    def _lookup(self, name: str) -> ZoneValue | None:
        """The zone value of ``name``: exact, else the closest wildcard, else None."""
        with self._lock:
            if name in self._records:
                return self._records[name]
            labels = name.split(".")
            for i in range(1, len(labels)):
                parent = ".".join(labels[i:])
                if parent in self._records or any(n.endswith("." + parent) for n in self._records):
                    # An existing closer name blocks wildcards above it (RFC 4592).
                    wildcard = self._records.get("*." + parent)
                    return wildcard
                wildcard = self._records.get("*." + parent)
                if wildcard is not None:
                    return wildcard
            return None

    def _exists(self, name: str) -> bool:
        """True for names in the zone, including empty non-terminals."""
        with self._lock:
            return name in self._records or any(n.endswith("." + name) for n in self._records)

    def handle(self, data: bytes, *, tcp: bool) -> bytes | None:
        """Answer one DNS message; None means "do not answer"."""
        try:
            request = DNSRecord.parse(data)
        except Exception:
            return None
        if not request.questions:
            return None
        # Raw labels, not dnslib's text form: that escapes spaces and odd bytes ("\\032").
        qname = ".".join(label.decode("utf-8", "replace") for label in request.q.qname.label).lower()
        qtype = QTYPE.get(request.q.qtype)
        with self._lock:
            self.queries.append((qname, str(qtype)))
        reply = request.reply()
        limit = UDP_LIMIT
        for rr in request.ar:
            if isinstance(rr.rdata, EDNS0) or rr.rtype == QTYPE.OPT:
                limit = max(UDP_LIMIT, rr.rclass)
        name = qname
        truncate = False
        for _ in range(MAX_CNAME_HOPS):
            value = self._lookup(name)
            if value == "TIMEOUT":
                return None
            if value == "SERVFAIL":
                reply.header.rcode = RCODE.SERVFAIL
                return bytes(reply.pack())
            if value == "TRUNCATE":
                truncate = True
                value = []
            if value is None:
                if not self._exists(name):
                    reply.header.rcode = RCODE.NXDOMAIN
                self._add_soa(reply, name)
                break
            assert isinstance(value, list)
            truncate = truncate or any(t.upper() == "TRUNCATE" for t, _ in value)
            wanted = [(t, d) for t, d in value if t.upper() not in SPECIALS]
            matching = [(t, d) for t, d in wanted if t.upper() == qtype or qtype == "ANY"]
            if not matching and any(t.upper() == "TIMEOUT" for t, _ in value):
                return None
            if matching:
                for rdtype, rdata in matching:
                    reply.add_answer(_rdata(rdtype, rdata, name, self.ttl))
                break
            cnames = [d for t, d in value if t.upper() == "CNAME"]
            if not cnames:
                self._add_soa(reply, name)
                break
            reply.add_answer(_rdata("CNAME", cnames[0], name, self.ttl))
            name = str(cnames[0]).lower().rstrip(".")
        packed = bytes(reply.pack())
        if not tcp and (truncate or len(packed) > limit):
            cut = DNSRecord(reply.header, q=request.q)
            cut.header.tc = 1
            cut.rr, cut.auth, cut.ar = [], [], []
            return bytes(cut.pack())
        return packed

    def _add_soa(self, reply: DNSRecord, name: str) -> None:
        """Authority SOA for negative answers, so resolvers can cache them (RFC 2308)."""
        labels = name.split(".")
        zone = ".".join(labels[-2:]) if len(labels) >= 2 else name
        soa = SOA(DNSLabel("ns." + zone), DNSLabel("hostmaster." + zone), (1, 3600, 600, 86400, self.ttl))
        reply.add_auth(RR(zone, QTYPE.SOA, rdata=soa, ttl=self.ttl))
