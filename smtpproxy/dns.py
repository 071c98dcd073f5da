"""One async caching DNS resolver shared by every check.

Built on dnspython's asyncio queries (``dns.asyncquery``): UDP with TCP fallback
on truncation, a per-lookup timeout, a shared LRU cache honouring TTLs (negative
answers by the SOA minimum, RFC 2308), and one query in flight per (name, type)
however many checks ask at once. DNS failures never raise: every lookup returns
a :class:`DnsAnswer` whose ``status`` says what happened.

TXT records: ``records`` holds each record's character-strings joined and decoded
as UTF-8 with ``errors="replace"`` (so invalid bytes can never spell a valid
policy tag, and the text is always safe to encode again); ``txt_strings`` holds the
exact bytes, one tuple of character-strings per record, for DKIM keys and SPF.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.resolver
import dns.reversename

from smtpproxy.addresses import parse_hostport
from smtpproxy.metrics import Metrics

TEMPORARY = frozenset({"servfail", "timeout", "error"})
MAX_TTL = 86_400  # cap on any cached TTL: a day, whatever the zone says
MAX_PTR_NAMES = 10  # RFC 7208 §4.6.4: more PTR names than this are not looked up


@dataclass(frozen=True, slots=True)
class DnsAnswer:
    """The outcome of one lookup.

    ``status``: "ok" (records found), "nodata", "nxdomain", "servfail", "timeout"
    or "error" (bad name, malformed or refused answer, network error).
    ``records`` are text forms: A/AAAA "192.0.2.1"; TXT decoded (see module doc);
    MX "10 mx.example.org"; PTR/CNAME/NS lower-case names without the final dot.
    ``ttl`` is the remaining lifetime in seconds (0 for uncached failures).
    """

    name: str
    rdtype: str
    status: str
    records: tuple[str, ...] = ()
    ttl: int = 0
    txt_strings: tuple[tuple[bytes, ...], ...] = ()

    @property
    def is_temporary_error(self) -> bool:
        """True for servfail, timeout and error: the answer may differ on retry."""
        return self.status in TEMPORARY

    @property
    def ok(self) -> bool:
        """True when records were found."""
        return self.status == "ok"


def _rdata_text(rdtype: str, rdata: Any) -> str:
    if rdtype in ("A", "AAAA"):
        return str(rdata.address)
    if rdtype == "MX":
        return f"{rdata.preference} {rdata.exchange.to_text(omit_final_dot=True).lower()}"
    if rdtype in ("PTR", "CNAME", "NS"):
        return str(rdata.target.to_text(omit_final_dot=True).lower())
    if rdtype in ("TXT", "SPF"):
        return b"".join(rdata.strings).decode("utf-8", errors="replace")
    return str(rdata.to_text())


def _system_nameservers() -> list[tuple[str, int]]:
    """Nameservers from the system's resolv.conf (127.0.0.1:53 when there is none)."""
    try:
        conf = dns.resolver.Resolver(configure=True)
    except (dns.resolver.NoResolverConfiguration, OSError):
        return [("127.0.0.1", 53)]
    return [(str(ns), conf.port) for ns in conf.nameservers] or [("127.0.0.1", 53)]


class Resolver:
    """The shared async resolver: ``await resolver.query("example.org", "TXT")``.

    ``nameservers``: "host:port" strings (port defaults to 53); None reads the
    system's resolv.conf. ``timeout`` bounds one lookup, split evenly across the
    nameservers tried in order. ``clock`` (monotonic seconds) is injectable for tests.
    """

    def __init__(
        self,
        nameservers: list[str] | None = None,
        timeout: float = 2.0,
        cache_size: int = 10_000,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._servers: list[tuple[str, int]]
        if nameservers is None:
            self._servers = _system_nameservers()
        else:
            self._servers = [
                (hp.host, hp.port) for hp in (parse_hostport(ns, default_port=53) for ns in nameservers)
            ]
            if not self._servers:
                raise ValueError("Resolver: expected at least one nameserver, got an empty list")
        if timeout <= 0 or cache_size < 1:
            raise ValueError(
                f"Resolver: expected timeout > 0 and cache_size >= 1, got {timeout}, {cache_size}"
            )
        self._timeout = timeout
        self._cache_size = cache_size
        self._metrics = metrics
        # Label children bound once: a cache hit is the hot path of SPF and DMARC.
        self._hits = metrics.dns_cache.labels(result="hit") if metrics is not None else None
        self._clock = clock
        self._cache: OrderedDict[tuple[str, str], tuple[float, DnsAnswer]] = OrderedDict()
        self._inflight: dict[tuple[str, str], asyncio.Task[DnsAnswer]] = {}

    @property
    def timeout(self) -> float:
        """Seconds one lookup may take before it answers status "timeout"."""
        return self._timeout

    def peek(self, name: str, rdtype: str) -> DnsAnswer | None:
        """The cached answer for (name, rdtype) without any I/O; None when not cached."""
        key = (name.lower().rstrip("."), rdtype.upper())
        entry = self._cache.get(key)
        if entry is None:
            return None
        expires, answer = entry
        remaining = expires - self._clock()
        if remaining <= 0:
            del self._cache[key]
            return None
        self._cache.move_to_end(key)
        if self._hits is not None:
            self._hits.inc()
        a = answer  # rebuilt directly: dataclasses.replace introspects the fields on every call
        return DnsAnswer(a.name, a.rdtype, a.status, a.records, int(remaining), a.txt_strings)

    async def query(self, name: str, rdtype: str) -> DnsAnswer:
        """Look ``name`` up for ``rdtype`` ("A", "TXT", ...): cached, coalesced, never raises."""
        qname = name.lower().rstrip(".")
        qtype = rdtype.upper()
        cached = self.peek(qname, qtype)
        if cached is not None:
            return cached
        key = (qname, qtype)
        task = self._inflight.get(key)
        if task is None:
            # A miss is a lookup that goes to the network; joining one in flight is not.
            if self._metrics is not None:
                self._metrics.dns_cache.labels(result="miss").inc()
            task = asyncio.get_running_loop().create_task(self._fetch(qname, qtype))
            self._inflight[key] = task
            task.add_done_callback(functools.partial(self._forget, key))
        # shield: a cancelled caller must not cancel the lookup other callers share.
        return await asyncio.shield(task)

    async def txt(self, name: str) -> DnsAnswer:
        """TXT records of ``name``."""
        return await self.query(name, "TXT")

    async def a(self, name: str) -> DnsAnswer:
        """A records of ``name``."""
        return await self.query(name, "A")

    async def aaaa(self, name: str) -> DnsAnswer:
        """AAAA records of ``name``."""
        return await self.query(name, "AAAA")

    async def mx(self, name: str) -> DnsAnswer:
        """MX records of ``name`` as "preference host"."""
        return await self.query(name, "MX")

    async def ptr(self, ip: str) -> DnsAnswer:
        """PTR records of an IP address; status "error" for text that is not an address."""
        try:
            rname = dns.reversename.from_address(ip).to_text(omit_final_dot=True)
        except (ValueError, dns.exception.DNSException):
            return DnsAnswer(ip, "PTR", "error")
        return await self.query(rname, "PTR")

    async def reverse_name(self, ip: str) -> str | None:
        """Forward-confirmed reverse DNS: a PTR name of ``ip`` whose A/AAAA contain ``ip``.

        None when there is no PTR, no name confirms, the address is invalid, or DNS fails.
        """
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return None
        ptr = await self.ptr(str(addr))
        if not ptr.ok:
            return None
        names = list(ptr.records[:MAX_PTR_NAMES])
        rdtype = "A" if addr.version == 4 else "AAAA"
        answers = await asyncio.gather(*(self.query(n, rdtype) for n in names))
        for host, answer in zip(names, answers, strict=True):
            if any(_same_ip(rec, addr) for rec in answer.records):
                return host
        return None

    async def probe(self) -> str | None:
        """None when some nameserver answers at all; else why none does (for ``/readyz``).

        Any DNS reply counts as answering, NXDOMAIN, SERVFAIL or REFUSED included:
        the question is whether lookups can get an answer, not what a name holds.
        Only timeouts and unreachable servers count against. Not cached here.
        """
        per_try = self._timeout / len(self._servers)
        failures = []
        for host, port in self._servers:
            # The root's NS: every recursive resolver has it cached; authoritative
            # servers answer REFUSED or a referral, which is an answer too.
            request = dns.message.make_query(dns.name.root, dns.rdatatype.NS)
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            try:
                async with asyncio.timeout(per_try):
                    await dns.asyncquery.udp(request, host, timeout=per_try, port=port, ignore_trailing=True)
                return None
            except (TimeoutError, dns.exception.Timeout):
                failures.append(f"{where} timed out")
            except OSError as err:
                failures.append(f"{where} unreachable ({err.strerror or err})")
            except (EOFError, ValueError, dns.exception.DNSException):
                return None  # something answered, if badly: the server is there
        return "DNS: no nameserver answers: " + ", ".join(failures)

    async def close(self) -> None:
        """Cancel lookups in flight and drop the cache."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._inflight.clear()
        self._cache.clear()

    # Internals ------------------------------------------------------------------

    def _forget(self, key: tuple[str, str], task: asyncio.Task[DnsAnswer]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]

    async def _fetch(self, qname: str, qtype: str) -> DnsAnswer:
        try:
            if not qname:
                raise ValueError("empty name")
            name = dns.name.from_text(qname)
            rdtype = dns.rdatatype.from_text(qtype)
        except (ValueError, UnicodeError, dns.exception.DNSException):
            self._count(qtype, "error")
            return DnsAnswer(qname, qtype, "error")
        # Latency uses the real clock: the injectable one is for TTL arithmetic.
        started = time.perf_counter()
        answer = await self._ask_servers(name, rdtype, qname, qtype)
        if self._metrics is not None:
            self._metrics.dns_latency.labels(type=_type_label(qtype)).observe(time.perf_counter() - started)
        self._count(qtype, answer.status)
        if not answer.is_temporary_error and answer.ttl > 0:
            self._store((qname, qtype), answer)
        return answer

    async def _ask_servers(self, name: dns.name.Name, rdtype: Any, qname: str, qtype: str) -> DnsAnswer:
        per_try = self._timeout / len(self._servers)
        answer = DnsAnswer(qname, qtype, "error")
        for host, port in self._servers:
            request = dns.message.make_query(name, rdtype)
            request.flags |= dns.flags.RD
            try:
                async with asyncio.timeout(per_try):
                    response, _tcp = await dns.asyncquery.udp_with_fallback(
                        request, host, timeout=per_try, port=port
                    )
            except (TimeoutError, dns.exception.Timeout):
                answer = DnsAnswer(qname, qtype, "timeout")
                continue
            except (OSError, EOFError, ValueError, dns.exception.DNSException):
                answer = DnsAnswer(qname, qtype, "error")
                continue
            answer = self._parse(response, qname, qtype)
            if not answer.is_temporary_error:
                return answer
        return answer

    def _parse(self, response: dns.message.Message, qname: str, qtype: str) -> DnsAnswer:
        rcode = response.rcode()
        if not isinstance(response, dns.message.QueryMessage):
            return DnsAnswer(qname, qtype, "error")
        if rcode == dns.rcode.SERVFAIL:
            return DnsAnswer(qname, qtype, "servfail")
        if rcode not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
            return DnsAnswer(qname, qtype, "error")
        try:
            chain = response.resolve_chaining()
        except (dns.exception.DNSException, KeyError):
            return DnsAnswer(qname, qtype, "error")
        ttl = max(0, min(int(chain.minimum_ttl), MAX_TTL))
        if chain.answer is None or len(chain.answer) == 0:
            # Without an SOA dnspython already falls back to a short default negative TTL.
            status = "nxdomain" if rcode == dns.rcode.NXDOMAIN else "nodata"
            return DnsAnswer(qname, qtype, status, ttl=ttl)
        rdatas = list(chain.answer)
        records = tuple(_rdata_text(qtype, rd) for rd in rdatas)
        strings: tuple[tuple[bytes, ...], ...] = ()
        if qtype in ("TXT", "SPF"):
            strings = tuple(tuple(rd.strings) for rd in rdatas)
        return DnsAnswer(qname, qtype, "ok", records, ttl, strings)

    def _store(self, key: tuple[str, str], answer: DnsAnswer) -> None:
        self._cache[key] = (self._clock() + answer.ttl, answer)
        self._cache.move_to_end(key)
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)

    def _count(self, qtype: str, outcome: str) -> None:
        if self._metrics is not None:
            self._metrics.dns_queries.labels(type=_type_label(qtype), outcome=outcome).inc()


class DnsReadiness:
    """``/readyz``'s DNS part: the outcome of :meth:`Resolver.probe`, kept ``ttl`` seconds.

    Kubernetes or a load balancer polls every few seconds; the nameservers are
    asked at most once per ``ttl``.
    """

    def __init__(
        self, resolver: Resolver, ttl: float = 5.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._resolver = resolver
        self._ttl = ttl
        self._clock = clock
        self._last: tuple[float, str | None] | None = None

    async def problem(self) -> str | None:
        """None while some nameserver answers; else why none does."""
        if self._last is not None and self._clock() - self._last[0] < self._ttl:
            return self._last[1]
        problem = await self._resolver.probe()
        self._last = (self._clock(), problem)
        return problem


def _type_label(qtype: str) -> str:
    # Unknown type words from callers stay out of label values (a closed set).
    return qtype if qtype in _KNOWN_TYPES else "other"


_KNOWN_TYPES = frozenset({"A", "AAAA", "TXT", "MX", "PTR", "CNAME", "NS", "SOA", "SPF", "SRV", "TLSA", "CAA"})


def _same_ip(text: str, addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    try:
        return ipaddress.ip_address(text) == addr
    except ValueError:
        return False
