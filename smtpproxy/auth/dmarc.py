"""DMARC (RFC 7489, with RFC 9091 ``np=``): record discovery, alignment, policy to apply.

Pure parts (record parsing, alignment, choosing the policy) are plain functions;
:class:`DmarcEvaluator` adds the DNS lookups through the shared Resolver.

Choices where the RFC leaves room (RFC 7489 §6.6.1, §6.6.3):

- No From header field, or none with a usable domain: ``permerror`` with
  disposition ``none`` (there is no author domain to protect; rules may act on it).
- Several author addresses: every distinct domain (at most ``MAX_FROM_DOMAINS``)
  is evaluated and the strictest outcome wins, as §6.6.1 permits ("apply the
  DMARC policy of each and choose the strictest"). More domains than that is a
  ``permerror`` with disposition ``reject``: nobody legitimate sends that.
- More than one DMARC record at a name: policy discovery ends and DMARC is not
  applied (§6.6.3 step 3): result ``none``, reason says so.
- A record without a valid ``p=`` counts only when it has ``rua=`` (then as
  ``p=none``), else it is ignored (§6.6.3 step 6).
"""

from __future__ import annotations

import asyncio
import email.utils
import random as _random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from publicsuffixlist import PublicSuffixList

from smtpproxy.auth.dkim import DkimSignatureResult
from smtpproxy.dns import DnsAnswer, Resolver

MAX_FROM_DOMAINS = 5
POLICIES = ("none", "quarantine", "reject")
_DMARC_PREFIX = re.compile(r"^\s*v\s*=\s*DMARC1\s*(;|$)")
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")
# One mailbox, "addr", "<addr>" or "Display Name <addr>" (plain or quoted name),
# whose address is a dot-atom: forms whose domain we can read without the email
# package. Group 1 or 2 is the domain. Anything else (groups, comments, lists,
# folding, odd quoting) goes to email.utils.getaddresses.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]"
_ADDR = rf"{_ATEXT}+(?:\.{_ATEXT}+)*@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)"
_NAME = r"""(?:[A-Za-z0-9!#$%&'*+/=?^_`{|}~. -]*|"[^"\\\r\n]*" *)"""
_SIMPLE_MAILBOX = re.compile(rf" *(?:{_ADDR}|{_NAME}<{_ADDR}>) *\Z")
# Result ranks for combining several author domains: higher is stricter.
_DISPOSITION_RANK = {"none": 0, "quarantine": 1, "reject": 2}
_RESULT_RANK = {"pass": 0, "none": 1, "permerror": 2, "fail": 3, "temperror": 4}


class SpfLike(Protocol):
    """What DMARC needs of an SPF result (``smtpproxy.auth.spf.SpfResult``)."""

    @property
    def result(self) -> str: ...

    @property
    def domain(self) -> str: ...


class DmarcRecordError(ValueError):
    """A TXT record at ``_dmarc.`` that is not a usable DMARC record."""


@dataclass(frozen=True, slots=True)
class DmarcRecord:
    """A parsed DMARC record; optional tags hold their RFC defaults when absent or invalid."""

    p: str
    sp: str | None = None
    np: str | None = None
    pct: int = 100
    adkim: str = "r"
    aspf: str = "r"
    rua: tuple[str, ...] = ()
    ruf: tuple[str, ...] = ()
    fo: str = "0"

    def policy_for(self, *, subdomain: bool, nonexistent: bool) -> str:
        """The policy that applies: ``np`` (non-existent subdomain), ``sp`` (subdomain), else ``p``."""
        if subdomain and nonexistent and self.np:
            return self.np
        if subdomain and self.sp:
            return self.sp
        return self.p


@dataclass(frozen=True, slots=True)
class DmarcResult:
    """The DMARC outcome for one message.

    ``policy`` is the policy published for the From domain (``p``, or ``sp``/``np``
    when those applied; "" without a record); ``disposition`` is what to do after
    ``pct`` sampling: none, quarantine or reject (always "none" unless result is fail).
    """

    result: str
    policy: str
    disposition: str
    from_domain: str
    org_domain: str
    spf_aligned: bool
    dkim_aligned: bool
    reason: str
    record: DmarcRecord | None = None


def _uris(value: str) -> tuple[str, ...]:
    return tuple(u.strip() for u in value.split(",") if u.strip())


def parse_dmarc_record(text: str) -> DmarcRecord:
    """Parse one DMARC TXT record (RFC 7489 §6.3); raise DmarcRecordError if it is not one.

    Invalid optional tags fall back to their defaults (§6.3: "syntax errors in the
    remainder of the record SHOULD be discarded in favor of default values").
    """
    if not _DMARC_PREFIX.match(text):
        raise DmarcRecordError("record does not start with v=DMARC1")
    tags: dict[str, str] = {}
    for part in text.split(";")[1:]:
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if sep and name and name not in tags:
            tags[name] = value.strip()
    rua = _uris(tags.get("rua", ""))
    p = tags.get("p", "").lower()
    if p not in POLICIES:
        if not rua:
            raise DmarcRecordError(f"p= must be none, quarantine or reject, got {p or 'nothing'!r}")
        p = "none"
    sp = tags.get("sp", "").lower()
    np = tags.get("np", "").lower()
    pct_text = tags.get("pct", "100")
    pct = int(pct_text) if pct_text.isdigit() and int(pct_text) <= 100 else 100
    adkim = tags.get("adkim", "r").lower()
    aspf = tags.get("aspf", "r").lower()
    return DmarcRecord(
        p=p,
        sp=sp if sp in POLICIES else None,
        np=np if np in POLICIES else None,
        pct=pct,
        adkim=adkim if adkim in ("r", "s") else "r",
        aspf=aspf if aspf in ("r", "s") else "r",
        rua=rua,
        ruf=_uris(tags.get("ruf", "")),
        fo=tags.get("fo", "0") or "0",
    )


def normalize_domain(domain: str) -> str | None:
    """Lower-case ASCII (IDNA) form of a domain; None when it is not a plausible host name."""
    d = domain.strip().rstrip(".").lower()
    if not d:
        return None
    try:
        d = d.encode("idna").decode("ascii") if not d.isascii() else d
    except UnicodeError:
        return None
    labels = d.split(".")
    if len(d) > 253 or len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return None
    return d


def org_domain(domain: str, psl: PublicSuffixList) -> str:
    """The organizational domain (RFC 7489 §3.2): public suffix plus one label; itself when a suffix."""
    return psl.privatesuffix(domain) or domain


def aligned(domain: str, from_domain: str, mode: str, psl: PublicSuffixList) -> bool:
    """Identifier alignment: strict needs equal domains, relaxed equal organizational domains."""
    a, b = domain.lower().rstrip("."), from_domain.lower().rstrip(".")
    if mode == "s":
        return a == b
    return a == b or org_domain(a, psl) == org_domain(b, psl)


def from_domains(from_header_values: Sequence[str]) -> list[str] | None:
    """Distinct author domains in order; None when no From field exists at all."""
    if not from_header_values:
        return None
    simple = [_SIMPLE_MAILBOX.match(v) for v in from_header_values]
    if all(simple):
        # ``getaddresses`` costs ~0.03 ms; for a lone plain mailbox it finds just this domain.
        addrs = [f"@{m.group(1) or m.group(2)}" for m in simple if m]
    else:
        addrs = [addr for _name, addr in email.utils.getaddresses(list(from_header_values))]
    out: list[str] = []
    for addr in addrs:
        if "@" in addr:
            d = normalize_domain(addr.rpartition("@")[2])
            if d and d not in out:
                out.append(d)
    return out


def _dmarc_records(answer: DnsAnswer) -> list[str]:
    return [r for r in answer.records if _DMARC_PREFIX.match(r)]


class DmarcEvaluator:
    """Evaluates DMARC for a message; built once per App (the PSL is costly to build)."""

    def __init__(
        self,
        resolver: Resolver,
        psl: PublicSuffixList | None = None,
        random: Callable[[], float] = _random.random,
    ) -> None:
        self.resolver = resolver
        self.psl = psl if psl is not None else PublicSuffixList()
        self.random = random

    async def evaluate(
        self,
        from_header_values: Sequence[str],
        spf: SpfLike | None,
        dkim: Sequence[DkimSignatureResult],
    ) -> DmarcResult:
        """DMARC for the author domain(s) of ``from_header_values`` (raw From field values). Never raises."""
        domains = from_domains(from_header_values)
        if domains is None or not domains:
            why = "no From header field" if domains is None else "no usable domain in From"
            return DmarcResult("permerror", "", "none", "", "", False, False, why)
        if len(domains) > MAX_FROM_DOMAINS:
            why = f"From has {len(domains)} different domains"
            return DmarcResult("permerror", "reject", "reject", domains[0], "", False, False, why)
        if len(domains) == 1:  # the usual case: no task per domain, no extra loop iteration
            return await self._evaluate_one(domains[0], spf, dkim)
        results = await asyncio.gather(*(self._evaluate_one(d, spf, dkim) for d in domains))
        return max(results, key=lambda r: (_DISPOSITION_RANK[r.disposition], _RESULT_RANK[r.result]))

    async def _evaluate_one(
        self, from_domain: str, spf: SpfLike | None, dkim: Sequence[DkimSignatureResult]
    ) -> DmarcResult:
        org = org_domain(from_domain, self.psl)
        found = await self._discover(from_domain, org)
        if isinstance(found, DmarcResult):
            return found
        record, at_org = found
        spf_ok = spf is not None and spf.result == "pass" and bool(spf.domain)
        spf_aligned = spf_ok and spf is not None and aligned(spf.domain, from_domain, record.aspf, self.psl)
        dkim_aligned = any(
            s.result == "pass" and aligned(s.domain, from_domain, record.adkim, self.psl) for s in dkim
        )
        subdomain = at_org and from_domain != org
        nonexistent = False
        if subdomain and record.np:
            # RFC 9091 §4.1: the name does not exist; NXDOMAIN holds for every type.
            nonexistent = (await self.resolver.query(from_domain, "A")).status == "nxdomain"
        policy = record.policy_for(subdomain=subdomain, nonexistent=nonexistent)

        def result(word: str, disposition: str, reason: str) -> DmarcResult:
            return DmarcResult(
                word, policy, disposition, from_domain, org, spf_aligned, dkim_aligned, reason, record
            )

        if spf_aligned or dkim_aligned:
            which = " and ".join(n for n, ok in (("spf", spf_aligned), ("dkim", dkim_aligned)) if ok)
            return result("pass", "none", f"aligned {which}")
        if any(
            s.result == "temperror" and aligned(s.domain, from_domain, record.adkim, self.psl) for s in dkim
        ) or (
            spf is not None
            and spf.result == "temperror"
            and bool(spf.domain)
            and aligned(spf.domain, from_domain, record.aspf, self.psl)
        ):
            # An aligned identifier we could not check might have passed: fail only when sure.
            return result("temperror", "none", "aligned spf or dkim had a temporary error")
        disposition = policy
        if policy != "none" and record.pct < 100 and not self.random() * 100 < record.pct:
            # §6.6.4: not sampled -> the next less strict policy.
            disposition = "quarantine" if policy == "reject" else "none"
        return result("fail", disposition, "no aligned spf or dkim pass")

    async def _discover(self, from_domain: str, org: str) -> tuple[DmarcRecord, bool] | DmarcResult:
        """The record and whether it came from the org domain, or a final result (none/temperror/...)."""

        def final(word: str, reason: str) -> DmarcResult:
            return DmarcResult(word, "", "none", from_domain, org, False, False, reason)

        names = [from_domain] if org == from_domain else [from_domain, org]
        for name in names:
            answer = await self.resolver.txt(f"_dmarc.{name}")
            if answer.is_temporary_error:
                return final("temperror", f"DNS {answer.status} for _dmarc.{name}")
            texts = _dmarc_records(answer) if answer.status == "ok" else []
            if len(texts) > 1:
                return final("none", f"{len(texts)} DMARC records at _dmarc.{name}: not applied")
            if len(texts) == 1:
                try:
                    return parse_dmarc_record(texts[0]), name != from_domain
                except DmarcRecordError:
                    # §6.6.3: an unusable record is as good as none; go on to the org domain.
                    continue
        return final("none", "no DMARC record")
