"""The fields a rule condition can look at, and the context they are read from.

Every field yields a tuple of values (a header may occur twice, a message has
many URLs); a comparison matches when any value matches. Values are computed
once per evaluation context and memoised, and the MIME facts once per
transaction (cached in its ``MessageFacts`` state); authentication results come from the
checks' typed state (:mod:`smtpproxy.auth.results`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import smtpproxy.rules.facts as facts
from smtpproxy.addresses import domain_of
from smtpproxy.auth.dkim import DkimResults
from smtpproxy.auth.results import arc_result, dkim_results, dmarc_result, spf_result
from smtpproxy.ratelimit.keys import client_ip, client_net
from smtpproxy.rules.mime import Attachment
from smtpproxy.rules.sessionstate import session_score
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.stages import Stage

STAGE_ORDER = {Stage.CONNECT: 0, Stage.HELO: 1, Stage.MAIL: 2, Stage.RCPT: 3, Stage.DATA: 4}


class Kind(enum.Enum):
    """What the values of a field are, which decides the operators it accepts."""

    TEXT = "text"
    IP = "ip address"
    NUMBER = "number"
    BOOL = "true/false"


# Told when a field cannot be read: the field's name and what went wrong.
FieldErrorHook = Callable[[str, Exception], None]


class EvalContext:
    """One evaluation of rules: the session, the transaction and recipient when known."""

    __slots__ = ("_memo", "on_error", "rcpt", "regex_hits", "session", "stage", "txn")

    def __init__(
        self,
        session: Session,
        txn: Transaction | None,
        stage: Stage,
        rcpt: Recipient | None = None,
        on_error: FieldErrorHook | None = None,
    ) -> None:
        self.session = session
        self.txn = txn
        self.stage = stage
        self.rcpt = rcpt
        self.on_error = on_error
        self._memo: dict[str, tuple[Any, ...]] = {}
        # regex group key -> {pattern index: first value it matched}; filled by conditions.
        self.regex_hits: dict[object, dict[int, str]] = {}

    def values(self, spec: FieldSpec) -> tuple[Any, ...]:
        """The values of a field, computed once."""
        found = self._memo.get(spec.name)
        if found is None:
            try:
                found = spec.extract(self)
            except Exception as err:
                # A fact that cannot be read is absent (the rule does not match),
                # but a bug of ours must be seen: counted and logged, not swallowed.
                found = ()
                if self.on_error is not None:
                    self.on_error(spec.name, err)
            self._memo[spec.name] = found
        return found

    def lowered(self, spec: FieldSpec) -> tuple[str, ...]:
        """The text values of a field, lower-cased once (for case-insensitive comparison)."""
        key = "\x00lower:" + spec.name
        found = self._memo.get(key)
        if found is None:
            found = tuple(str(v).lower() for v in self.values(spec))
            self._memo[key] = found
        return found

    def headers(self) -> dict[str, tuple[str, ...]]:
        """Decoded header fields of the message (empty before DATA)."""
        return facts.headers(self.txn)

    def from_field(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """Display names and addresses of From."""
        return facts.from_field(self.txn)

    def attachments(self) -> tuple[Attachment, ...]:
        """Attachments of the message (walks the MIME tree once per transaction)."""
        return facts.body_parts(self.txn).attachments

    @property
    def score(self) -> float:
        """The score so far: the transaction's, or the connection's before MAIL."""
        if self.txn is not None:
            return self.txn.score
        return session_score(self.session)


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """A field: its name, kind, the first stage it is known at, and how to read it."""

    name: str
    kind: Kind
    stage: Stage
    extract: Callable[[EvalContext], tuple[Any, ...]]
    help: str


def _get(obj: Any, name: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(name)
    value = getattr(obj, name, None)
    if value is None:
        details = getattr(obj, "details", None)
        if isinstance(details, dict):
            value = details.get(name)
    return value


def _typed(txn: Transaction, name: str) -> Any:
    """What the authentication check ``name`` kept in ``txn.state`` (None when it did not run)."""
    if name == "dkim":
        return dkim_results(txn) if txn.state.peek(DkimResults) is not None else None
    reader = {"spf": spf_result, "dmarc": dmarc_result, "arc": arc_result}.get(name)
    return reader(txn) if reader is not None else None


def _result(ctx: EvalContext, name: str) -> list[Any]:
    """Result objects of an authentication method (the check's typed state, else its CheckResults)."""
    txn = ctx.txn
    if txn is None:
        return []
    found = _typed(txn, name)
    if found is None:
        found = txn.results.get(name)
    if found is None:
        return []
    return list(found) if isinstance(found, list | tuple) else [found]


def _words(ctx: EvalContext, method: str, attr: str) -> tuple[str, ...]:
    return tuple(str(v).lower() for v in (_get(r, attr) for r in _result(ctx, method)) if v)


def _arc_domains(ctx: EvalContext) -> tuple[str, ...]:
    out: list[str] = []
    for r in _result(ctx, "arc"):
        domains = _get(r, "domains") or ()
        out.extend(str(d).lower() for d in ([domains] if isinstance(domains, str) else domains))
    return tuple(out)


def _rcpts(ctx: EvalContext) -> tuple[str, ...]:
    if ctx.stage is Stage.RCPT and ctx.rcpt is not None:
        return (ctx.rcpt.address,)
    return tuple(r.address for r in ctx.txn.recipients) if ctx.txn else ()


def _rcpt_count(ctx: EvalContext) -> tuple[float, ...]:
    if ctx.txn is None:
        return ()
    known = list(ctx.txn.recipients)
    if ctx.rcpt is not None and ctx.rcpt not in known:
        known.append(ctx.rcpt)
    return (float(len(known)),)


def _size(ctx: EvalContext) -> tuple[float, ...]:
    txn = ctx.txn
    if txn is None:
        return ()
    if txn.message:
        return (float(len(txn.message)),)
    for param in txn.mail_params:
        key, _, value = param.partition("=")
        if key.upper() == "SIZE" and value.isdigit():
            return (float(value),)
    return ()


def _client_net(ctx: EvalContext) -> tuple[str, ...]:
    # The rate-limit key kind client_net with its default prefixes: a botnet
    # spread over one provider's /24 (or one IPv6 site's /64) counts as one.
    ip = client_ip(ctx.session)
    return (client_net(ip, 24 if ip.version == 4 else 64),)


def _mail_from(ctx: EvalContext) -> tuple[str, ...]:
    return (ctx.txn.mail_from,) if ctx.txn is not None else ()


def _local(address: str) -> str:
    return address.rpartition("@")[0] if "@" in address else address


def _attachments(ctx: EvalContext, pick: Callable[[Any], Any]) -> tuple[Any, ...]:
    return tuple(v for v in (pick(a) for a in ctx.attachments()) if v not in (None, ""))


def _archive_names(ctx: EvalContext) -> tuple[str, ...]:
    return tuple(n for a in ctx.attachments() if a.archive for n in a.archive.names)


def _ext(name: str) -> str:
    base = name.rsplit("/", 1)[-1].rstrip(". \t")
    return base.rpartition(".")[2].lower() if "." in base else ""


def _f(
    name: str, kind: Kind, stage: Stage, extract: Callable[[EvalContext], tuple[Any, ...]], help: str
) -> FieldSpec:
    return FieldSpec(name, kind, stage, extract, help)


T, IPK, N, B = Kind.TEXT, Kind.IP, Kind.NUMBER, Kind.BOOL
C, H, M, R, D = Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.DATA

FIELDS: dict[str, FieldSpec] = {
    f.name: f
    for f in (
        _f("client.ip", IPK, C, lambda c: (c.session.client_ip,), "the client's IP address"),
        _f("client.net", T, C, _client_net, "the client's network: IPv4 /24, IPv6 /64 (192.0.2.0/24)"),
        _f(
            "client.rdns",
            T,
            C,
            lambda c: (c.session.rdns,) if c.session.rdns else (),
            "verified reverse DNS name",
        ),
        _f("helo", T, H, lambda c: (c.session.helo,) if c.session.helo else (), "the HELO/EHLO name"),
        _f("tls", B, H, lambda c: (c.session.tls is not None,), "true when the client used STARTTLS"),
        _f("tls.version", T, H, lambda c: (c.session.tls.version,) if c.session.tls else (), "e.g. TLSv1.3"),
        _f(
            "auth.user",
            T,
            M,
            lambda c: (c.session.auth_user,) if c.session.auth_user else (),
            "the AUTH user name (submission; absent when not authenticated)",
        ),
        _f(
            "auth.mechanism",
            T,
            M,
            lambda c: (c.session.auth_mechanism,) if c.session.auth_mechanism else (),
            "the SASL mechanism of AUTH: PLAIN or LOGIN",
        ),
        _f("mail_from", T, M, _mail_from, "MAIL FROM address ('' for the null sender)"),
        _f("mail_from.local", T, M, lambda c: tuple(_local(a) for a in _mail_from(c)), "local part"),
        _f("mail_from.domain", T, M, lambda c: tuple(domain_of(a) for a in _mail_from(c)), "domain"),
        _f("rcpt", T, R, _rcpts, "each RCPT TO address (at stage rcpt: the one being checked)"),
        _f("rcpt.local", T, R, lambda c: tuple(_local(a) for a in _rcpts(c)), "local part of each recipient"),
        _f("rcpt.domain", T, R, lambda c: tuple(domain_of(a) for a in _rcpts(c)), "domain of each recipient"),
        _f("rcpt.count", N, R, _rcpt_count, "number of recipients so far"),
        _f("size", N, M, _size, "message size in bytes (declared SIZE= before DATA)"),
        _f("spf", T, M, lambda c: _words(c, "spf", "result"), "SPF result word"),
        _f("score", N, C, lambda c: (c.score,), "the score so far"),
        _f("subject", T, D, lambda c: c.headers().get("subject", ()), "Subject, decoded"),
        _f("from.name", T, D, lambda c: c.from_field()[0], "From display name, decoded"),
        _f("from.address", T, D, lambda c: c.from_field()[1], "From address"),
        _f("from.domain", T, D, lambda c: tuple(domain_of(a) for a in c.from_field()[1]), "From domain"),
        _f("body", T, D, lambda c: (facts.body_text(c.txn).text,), "text of text/plain and text/html parts"),
        _f("url", T, D, lambda c: facts.body_urls(c.txn)[0], "each URL in the body"),
        _f("url.domain", T, D, lambda c: facts.body_urls(c.txn)[1], "each URL's host name"),
        _f("attachment.name", T, D, lambda c: _attachments(c, lambda a: a.filename), "file name"),
        _f("attachment.extension", T, D, lambda c: _attachments(c, lambda a: a.extension), "last extension"),
        _f("attachment.type", T, D, lambda c: _attachments(c, lambda a: a.declared_type), "declared type"),
        _f(
            "attachment.detected_type", T, D, lambda c: _attachments(c, lambda a: a.detected_type), "by magic"
        ),
        _f("attachment.size", N, D, lambda c: _attachments(c, lambda a: float(a.size)), "decoded size"),
        _f("attachment.count", N, D, lambda c: (float(len(c.attachments())),), "number of attachments"),
        _f("archive.name", T, D, _archive_names, "names inside zip attachments (nested: outer.zip/inner)"),
        _f("archive.extension", T, D, lambda c: tuple(e for e in map(_ext, _archive_names(c)) if e), "ext"),
        _f(
            "archive.encrypted",
            B,
            D,
            lambda c: (any(a.archive.encrypted for a in c.attachments() if a.archive),),
            "true when a zip attachment has encrypted entries",
        ),
        _f("dkim", T, D, lambda c: _words(c, "dkim", "result"), "each DKIM signature's result"),
        _f("dkim.domain", T, D, lambda c: _words(c, "dkim", "domain"), "each DKIM signature's d= domain"),
        _f(
            "dkim.pass_domain",
            T,
            D,
            lambda c: tuple(
                str(_get(r, "domain")).lower()
                for r in _result(c, "dkim")
                if str(_get(r, "result")).lower() == "pass" and _get(r, "domain")
            ),
            "domains of passing DKIM signatures",
        ),
        _f("dmarc", T, D, lambda c: _words(c, "dmarc", "result"), "DMARC result word"),
        _f(
            "dmarc.policy",
            T,
            D,
            lambda c: _words(c, "dmarc", "policy"),
            "published policy (none/quarantine/reject)",
        ),
        _f("dmarc.disposition", T, D, lambda c: _words(c, "dmarc", "disposition"), "what DMARC decided"),
        _f("arc", T, D, lambda c: _words(c, "arc", "result"), "ARC chain result"),
        _f("arc.domain", T, D, _arc_domains, "domains of the ARC sealers"),
    )
}


def header_field(name: str) -> FieldSpec:
    """The field ``header.NAME``: every occurrence of that header, decoded."""
    low = name.lower()
    return FieldSpec("header." + low, Kind.TEXT, Stage.DATA, lambda c: c.headers().get(low, ()), "a header")


def lookup(name: str) -> FieldSpec | None:
    """The field called ``name`` (``header.X-Anything`` included), or None."""
    if name.lower().startswith("header.") and len(name) > len("header."):
        return header_field(name[len("header.") :])
    return FIELDS.get(name)
