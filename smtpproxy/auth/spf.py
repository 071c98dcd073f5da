"""SPF (RFC 7208) with pyspf, on our async resolver, without blocking the event loop.

pyspf is synchronous and asks DNS through ``query.dns()``. We subclass its
``query`` so that ``dns()`` reads answers from a per-evaluation dict instead
("prefetch and rerun"): when an answer is missing, the evaluation stops with a
private exception naming the (name, type), the answer is fetched through the
shared :class:`~smtpproxy.dns.Resolver`, and the evaluation runs again from the
start. Answers already in the resolver's cache are read synchronously, so a warm
evaluation runs once, with no thread hop and no await; a sender seen before
whose answers are all still cached unchanged gets its stored result
(:mod:`smtpproxy.auth.spfcache`) without running pyspf at all. pyspf keeps the RFC's
limits (10 DNS-querying terms, 2 void lookups, 10 MX/PTR names); the number of
reruns is bounded by them.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
from dataclasses import dataclass
from typing import Any

import spf

from smtpproxy.auth.spfcache import SpfResultCache
from smtpproxy.config import SpfConfig
from smtpproxy.dns import DnsAnswer, Resolver
from smtpproxy.metrics import Metrics
from smtpproxy.session import CheckResult, Session, Transaction
from smtpproxy.stages import Check, CheckOutcome
from smtpproxy.verdict import reject

RESULTS = ("pass", "fail", "softfail", "neutral", "none", "temperror", "permerror")
# Distinct lookups one evaluation may need within the RFC limits: 10 terms, each
# "mx" or "ptr" up to 10 names, plus the record, exp= and the %{p} macro.
MAX_RUNS = 160
MAX_TEXT = 200
_UNSAFE = re.compile(r"[^\x20-\x7e]+")
log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SpfResult:
    """The outcome of one SPF evaluation.

    ``identity`` is "mailfrom" or "helo"; ``sender`` the address checked
    (postmaster@helo for the helo identity); ``explanation`` is safe to put in an
    SMTP reply or a header (printable ASCII only, bounded length).
    """

    result: str
    domain: str
    identity: str
    sender: str
    explanation: str
    comment: str = ""


def sanitize(text: str, limit: int = MAX_TEXT) -> str:
    """Printable ASCII only, whitespace runs collapsed, at most ``limit`` characters."""
    clean = " ".join(_UNSAFE.sub(" ", text).split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


class _NeedAnswer(Exception):
    """The evaluation needs a DNS answer it does not have yet."""

    def __init__(self, key: tuple[str, str]) -> None:
        super().__init__(key)
        self.key = key


class _Query(spf.query):  # type: ignore[misc]
    """A pyspf query whose DNS answers come from a dict of :class:`DnsAnswer`."""

    def __init__(self, answers: dict[tuple[str, str], DnsAnswer], resolver: Resolver, **kwargs: Any) -> None:
        self._answers = answers
        self._resolver = resolver
        # Keys asked for but missing; pyspf swallows exceptions around exp=, so we
        # cannot rely on _NeedAnswer reaching the caller.
        self.missing: list[tuple[str, str]] = []
        super().__init__(**kwargs)

    def dns(
        self, name: Any, qtype: str, cnames: Any = None, ignore_void: bool = False
    ) -> list[Any]:  # pyspf's signature; CNAMEs are followed by the resolver
        if not name:
            raise spf.PermError("Invalid DNS query: empty name")
        text = str(name).rstrip(".").lower()
        if not all(0 < len(label) < 64 for label in text.split(".")):
            return []  # pyspf: an invalid name yields no records and no void lookup
        key = (text, qtype)
        answer = self._answers.get(key)
        if answer is None:
            answer = self._resolver.peek(text, qtype)
            if answer is None:
                self.missing.append(key)
                raise _NeedAnswer(key)
            self._answers[key] = answer
        if answer.is_temporary_error:
            raise spf.TempError(f"DNS {answer.status} looking up {qtype} {text}")
        result = _pyspf_records(answer, qtype)
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result

    def validated_ptrs(self) -> list[str]:
        """PTR names of the client that resolve back to it (the "ptr" mechanism and %{p}).

        RFC 7208 §5.5: a DNS error on the PTR lookup means no match, and a name
        whose address lookup fails is skipped; pyspf would turn both into temperror.
        """
        try:
            names: list[str] = self.dns_ptr(self.i)[: spf.MAX_PTR]
        except spf.TempError:
            return []
        confirmed = []
        for name in names:
            try:
                addresses = self.dns_a(name, self.A)
            except spf.TempError:
                continue
            if self.cidrmatch(addresses, self.cidrmax):
                confirmed.append(name)
        return confirmed


def _pyspf_records(answer: DnsAnswer, qtype: str) -> list[Any]:
    """Records in the shapes pyspf's DNS drivers return."""
    if qtype in ("TXT", "SPF"):
        return list(answer.txt_strings)
    if qtype == "MX":
        out: list[Any] = []
        for rec in answer.records:
            pref, _, host = rec.partition(" ")
            out.append((int(pref), host))
        return out
    return list(answer.records)


class SpfChecker:
    """Evaluates SPF for an SMTP client: ``await checker.check(ip, mail_from, helo)``."""

    def __init__(self, resolver: Resolver, timeout: float = 15.0) -> None:
        self._resolver = resolver
        self._timeout = timeout
        self.cache = SpfResultCache(resolver)

    async def check(self, client_ip: str, mail_from: str, helo: str) -> SpfResult:
        """SPF of MAIL FROM, or of the HELO identity when ``mail_from`` is empty (null sender).

        Never raises: DNS failures give temperror, the whole evaluation bounded by the timeout.
        """
        helo = helo.strip().rstrip(".")
        if mail_from:
            identity = "mailfrom"
            local, _, domain = mail_from.rpartition("@") if "@" in mail_from else ("", "", mail_from)
            sender = f"{local or 'postmaster'}@{domain}"
        else:
            identity, domain, sender = "helo", helo, f"postmaster@{helo}"
        domain = domain.lower().rstrip(".")
        try:
            ipaddress.ip_address(client_ip)
        except ValueError:
            return SpfResult("permerror", domain, identity, sanitize(sender), "invalid client IP address")
        if not domain:
            return SpfResult("none", "", identity, sanitize(sender), "no domain to check")
        cached: SpfResult | None = self.cache.get((client_ip, mail_from, helo))
        if cached is not None:
            return cached
        try:
            async with asyncio.timeout(self._timeout):
                return await self._evaluate(client_ip, mail_from, helo, identity, domain, sender)
        except TimeoutError:
            return SpfResult(
                "temperror", domain, identity, sanitize(sender), "SPF evaluation timed out", "timeout"
            )

    async def _evaluate(
        self, client_ip: str, mail_from: str, helo: str, identity: str, domain: str, sender: str
    ) -> SpfResult:
        answers: dict[tuple[str, str], DnsAnswer] = {}
        for _ in range(MAX_RUNS):
            try:
                query = _Query(answers, self._resolver, i=client_ip, s=mail_from, h=helo, strict=True)
            except spf.PermError as err:  # the client address itself is unusable
                return SpfResult("permerror", domain, identity, sanitize(sender), sanitize(str(err)))
            try:
                result, _code, explanation = query.check()
            except _NeedAnswer:
                result, explanation = "", ""
            except Exception:
                # A pyspf bug on odd input must not become a permanent failure: retry later.
                log.exception("SPF evaluation of %s for %s raised", domain, client_ip)
                return SpfResult("temperror", domain, identity, sanitize(sender), "SPF evaluation error")
            if query.missing:
                await self._fetch(query, query.missing)
                continue
            comment = query.get_header_comment(result) if result in RESULTS else ""
            res = SpfResult(
                result, domain, identity, sanitize(sender), sanitize(explanation), sanitize(comment)
            )
            self.cache.put((client_ip, mail_from, helo), res, answers)
            return res
        return SpfResult("permerror", domain, identity, sanitize(sender), "too many DNS lookups")

    async def _fetch(self, query: _Query, keys: list[tuple[str, str]]) -> None:
        """Fetch missing answers; for MX and PTR also the addresses pyspf will ask next."""
        unique = list(dict.fromkeys(keys))
        fetched = await asyncio.gather(*(self._resolver.query(name, rdtype) for name, rdtype in unique))
        follow: list[str] = []
        for (name, rdtype), answer in zip(unique, fetched, strict=True):
            query._answers[(name, rdtype)] = answer
            if rdtype == "MX" and answer.ok:
                follow += [rec.partition(" ")[2] for rec in answer.records[: spf.MAX_MX]]
            elif rdtype == "PTR" and answer.ok:
                follow += list(answer.records[: spf.MAX_PTR])
        # pyspf resolves every MX and PTR name in turn: ask for them all at once.
        wanted = [(h, query.A) for h in dict.fromkeys(follow) if h and (h, query.A) not in query._answers]
        more = await asyncio.gather(*(self._resolver.query(h, t) for h, t in wanted))
        for key, answer in zip(wanted, more, strict=True):
            query._answers[key] = answer


class SpfCheck(Check):
    """Pipeline check: SPF at MAIL FROM; records the result, rejects only when configured."""

    name = "spf"

    def __init__(self, config: SpfConfig, resolver: Resolver, metrics: Metrics) -> None:
        self._config = config
        self._checker = SpfChecker(resolver, timeout=config.timeout)
        self._metrics = metrics

    async def mail(self, session: Session, txn: Transaction) -> CheckOutcome:
        """Evaluate SPF, record ``CheckResult("spf", ...)`` and the ``SpfResult`` in ``txn.state``."""
        helo = session.helo or ""
        if not txn.mail_from and not self._config.helo_check:
            res = SpfResult("none", "", "helo", "", "HELO identity not checked", "helo check disabled")
        else:
            res = await self._checker.check(session.client_address, txn.mail_from, helo)
        key = "smtp.mailfrom" if res.identity == "mailfrom" else "smtp.helo"
        value = res.sender if res.identity == "mailfrom" else sanitize(helo)
        details = {"domain": res.domain, "identity": res.identity, key: value}
        txn.add_result(CheckResult("spf", res.result, details, res.comment))
        txn.state.put(res)
        self._metrics.auth_results.labels(method="spf", result=res.result).inc()
        if res.result == "fail" and self._config.reject_on_fail:
            text = f"SPF validation failed for {res.domain}: {res.explanation}"
            return reject(550, "5.7.23", sanitize(text, 400), "spf")
        if res.result == "temperror" and self._config.tempfail_on_temperror:
            return reject(451, "4.4.3", f"Temporary DNS failure checking SPF for {res.domain}", "spf")
        return None


def build_spf_check(config: SpfConfig, resolver: Resolver, metrics: Metrics) -> SpfCheck | None:
    """The SPF check for the app, or None when ``spf.enabled`` is false."""
    return SpfCheck(config, resolver, metrics) if config.enabled else None
