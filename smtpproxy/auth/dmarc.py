"""DMARC (RFC 7489, with RFC 9091 ``np=``): record discovery, alignment, policy to apply.

Pure parts (record parsing, alignment, choosing the policy) are plain functions;
:class:`DmarcEvaluator` adds the DNS lookups through the shared Resolver.

Policy discovery follows RFC 7489 §6.6.3 step by step:

- TXT records at ``_dmarc.<From domain>`` that do not start with ``v=DMARC1`` are
  discarded (steps 1-2); only when none is left is the organizational domain
  asked (step 3). A ``v=DMARC1`` record at the From domain ends discovery even
  when it is invalid: there is no fallback to the org domain once one exists.
- More than one DMARC record at a name: discovery ends and DMARC is not applied
  (step 5): result ``none``, reason says so.
- A record whose ``p=`` or ``sp=`` is not a valid policy (step 6): with at least
  one syntactically valid ``rua=`` URI it acts as a record with ``p=none`` (result
  pass/fail as usual, never enforced); without one, DMARC is not applied
  (result ``none``). Other invalid tags (``pct``, ``adkim``, ``aspf``, ``np``) take
  their defaults (§6.3: "syntax errors in the remainder of the record SHOULD be
  discarded in favor of default values (if any) or ignored outright").
- ``np=`` applies to a non-existent subdomain as RFC 9091 §2.1 defines it:
  NXDOMAIN, or NODATA for each of A, AAAA and MX.

Choices where the RFC leaves room (RFC 7489 §6.6.1, §6.6.3):

- No From header field, or none with a usable domain: ``permerror`` with
  disposition ``none`` (there is no author domain to protect; rules may act on it).
- Several author addresses: every distinct domain (at most ``MAX_FROM_DOMAINS``)
  is evaluated and the strictest outcome wins, as §6.6.1 permits ("apply the
  DMARC policy of each and choose the strictest"). More domains than that is a
  ``permerror`` with disposition ``reject``: nobody legitimate sends that.
- A DNS failure while deciding whether a subdomain exists (only asked when ``np``
  differs from the policy that applies otherwise) is a ``temperror``: guessing
  either way could apply the wrong policy.
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
# A DMARC reporting URI (RFC 7489 §6.4 dmarc-uri): an absolute URI (RFC 3986
# scheme ":" and no white space), optionally "!size"; a mailto: one needs an address.
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:[^\s!]+(?:![0-9]+[kmgtKMGT]?)?$")
_MAILTO = re.compile(r"^mailto:[^@\s]+@[^@\s!]+", re.IGNORECASE)
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
    """A TXT record at ``_dmarc.`` that is not a usable DMARC record.

    Discovery tells the two kinds apart before parsing: text without ``v=DMARC1``
    is discarded (RFC 7489 §6.6.3 step 2); a ``v=DMARC1`` record with an invalid
    ``p``/``sp`` and no valid ``rua`` means DMARC is not applied (step 6).
    """


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
    # Why the record stands for "p=none" (RFC 7489 §6.6.3 step 6), e.g. "invalid
    # sp=bogus"; "" for a record whose policies are valid.
    as_p_none: str = ""

    def policy_for(self, *, subdomain: bool, nonexistent: bool) -> str:
        """The policy that applies: ``np`` (non-existent subdomain), ``sp`` (subdomain), else ``p``.

        RFC 9091 §3.1: without ``np`` a non-existent subdomain gets ``sp`` if present,
        else ``p``; RFC 7489 §6.3: without ``sp`` a subdomain gets ``p``.
        """
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


def valid_report_uri(uri: str) -> bool:
    """True for a syntactically valid DMARC reporting URI (RFC 7489 §6.4 ``dmarc-uri``)."""
    if not _URI.match(uri):
        return False
    return _MAILTO.match(uri) is not None if uri[:7].lower() == "mailto:" else True


def _shown(value: str) -> str:
    """A tag value from DNS, short enough to quote in a reason."""
    value = value or "nothing"
    return value if len(value) <= 20 else value[:17] + "..."


def parse_dmarc_record(text: str) -> DmarcRecord:
    """Parse one DMARC TXT record (RFC 7489 §6.3); raise DmarcRecordError if it is not usable.

    Not usable: no ``v=DMARC1`` start, or an invalid ``p``/``sp`` without a valid
    ``rua`` (§6.6.3 step 6.2). An invalid ``p``/``sp`` with a valid ``rua`` gives a
    record "as if ... p=none was retrieved" (step 6.1): ``p="none"``, no ``sp``/``np``,
    and ``as_p_none`` saying why. Other invalid tags fall back to their defaults
    (§6.3: "syntax errors in the remainder of the record SHOULD be discarded in
    favor of default values").
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
    sp = tags.get("sp", "").lower()
    np = tags.get("np", "").lower()
    # §6.6.3 step 6: an invalid p, or an sp that is present and invalid.
    invalid = [f"p={_shown(p)}"] if p not in POLICIES else []
    if "sp" in tags and sp not in POLICIES:
        invalid.append(f"sp={_shown(sp)}")
    as_p_none = ""
    if invalid:
        if not any(valid_report_uri(u) for u in rua):
            raise DmarcRecordError(f"invalid {' and '.join(invalid)}, no valid rua")
        # Step 6.1: act as if "v=DMARC1; p=none" was retrieved; reporting tags stay.
        as_p_none = f"invalid {' and '.join(invalid)}, treated as p=none"
        p, sp, np = "none", "", ""
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
        as_p_none=as_p_none,
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
        policy = record.policy_for(subdomain=subdomain, nonexistent=False)
        if subdomain and record.np and record.np != policy:
            # RFC 9091 §3.1: np applies only to non-existent subdomains of the org
            # domain (a record at the From domain itself never gets here).
            exists = await self._exists(from_domain)
            if exists is None and not (spf_aligned or dkim_aligned):
                why = f"DNS failure deciding whether {from_domain} exists, for np="
                return DmarcResult(
                    "temperror", "", "none", from_domain, org, spf_aligned, dkim_aligned, why, record
                )
            if exists is False:
                policy = record.policy_for(subdomain=True, nonexistent=True)
        note = f"; {record.as_p_none}" if record.as_p_none else ""

        def result(word: str, disposition: str, reason: str) -> DmarcResult:
            return DmarcResult(
                word, policy, disposition, from_domain, org, spf_aligned, dkim_aligned, reason + note, record
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

    async def _exists(self, domain: str) -> bool | None:
        """Whether ``domain`` exists as RFC 9091 §2.1 defines it; None on a DNS failure.

        §2.1: "a non-existent domain is a domain for which there is an NXDOMAIN or
        NODATA response for A, AAAA, and MX records". NXDOMAIN for A already says
        the name holds no records of any type (RFC 8020), so AAAA and MX are asked
        only after a NODATA for A.
        """
        first = await self.resolver.query(domain, "A")
        if first.is_temporary_error:
            return None
        if first.status != "nodata":
            return first.status != "nxdomain"
        rest = await asyncio.gather(self.resolver.query(domain, "AAAA"), self.resolver.query(domain, "MX"))
        if any(a.is_temporary_error for a in rest):
            return None
        return not all(a.status in ("nxdomain", "nodata") for a in rest)

    async def _discover(self, from_domain: str, org: str) -> tuple[DmarcRecord, bool] | DmarcResult:
        """The record and whether it came from the org domain, or a final result (none/temperror/...)."""

        def final(word: str, reason: str) -> DmarcResult:
            return DmarcResult(word, "", "none", from_domain, org, False, False, reason)

        names = [from_domain] if org == from_domain else [from_domain, org]
        for name in names:
            answer = await self.resolver.txt(f"_dmarc.{name}")
            if answer.is_temporary_error:
                return final("temperror", f"DNS {answer.status} for _dmarc.{name}")
            # §6.6.3 steps 2 and 4: records without v=DMARC1 are discarded.
            texts = _dmarc_records(answer) if answer.status == "ok" else []
            if len(texts) > 1:
                # Step 5: several records end discovery; DMARC is not applied.
                return final("none", f"{len(texts)} DMARC records at _dmarc.{name}: not applied")
            if len(texts) == 1:
                # Step 3 asks the org domain only when the set is empty: a v=DMARC1
                # record here decides, valid or not.
                try:
                    return parse_dmarc_record(texts[0]), name != from_domain
                except DmarcRecordError as err:
                    # Step 6.2: invalid p/sp and no valid rua: no DMARC processing.
                    return final("none", f"{err} at _dmarc.{name}: not applied")
        return final("none", "no DMARC record")
