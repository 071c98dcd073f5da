"""The facts rules look at in a message: decoded headers, body text, URLs, attachments.

Computed in layers, each at most once per transaction and only when a rule
reads it (cached in the transaction's ``MessageFacts`` by :mod:`smtpproxy.rules.facts`): header
fields; the MIME walk (attachments, text parts still encoded); the text; the
URLs. Header-only rules never walk the body, attachment rules never decode
text, text rules never look for links. Broken MIME never raises: every step is
guarded and degrades to "less text".
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
from collections.abc import Iterable
from dataclasses import dataclass
from email.message import Message
from typing import Any

from smtpproxy.rules.archive import ZipLimits, ZipListing, sniff, zip_listing
from smtpproxy.rules.htmltext import extract_urls, html_links, strip_scripts, visible_text
from smtpproxy.rules.htmltext import html_to_text as html_to_text  # part of this module's API
from smtpproxy.rules.rawmime import Field, parse_message

MAX_TEXT = 1_000_000  # characters of body text kept for rules (all text parts together)
MAX_PARTS = 256  # MIME parts walked


@dataclass(frozen=True, slots=True)
class Attachment:
    """One attachment as rules see it."""

    filename: str
    extension: str  # lower-case, without the dot; the last one of invoice.pdf.exe
    declared_type: str
    detected_type: str
    size: int
    archive: ZipListing | None


@dataclass(frozen=True, slots=True)
class TextPart:
    """A text/plain or text/html part, still encoded: decoded only when a rule reads the text."""

    payload: bytes
    charset: str | None
    html: bool


@dataclass(frozen=True, slots=True)
class BodyParts:
    """The MIME walk: text parts, attachments, parts walked; ``raw`` text when it is not MIME at all."""

    texts: tuple[TextPart, ...]
    attachments: tuple[Attachment, ...]
    parts: int
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class BodyText:
    """The body as text (``text``), per text part, and the HTML parts read, for their links."""

    text: str
    texts: tuple[str, ...]
    markups: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """What the body holds: text of text parts, URLs, attachments."""

    text: str
    urls: tuple[str, ...]
    url_domains: tuple[str, ...]
    attachments: tuple[Attachment, ...]
    parts: int


def _to_text(value: str) -> str:
    """A raw header value (surrogate-escaped bytes) as text: unfolded, 8-bit decoded as UTF-8."""
    value = value.replace("\r", "").replace("\n", "")
    try:
        return value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    except UnicodeError:
        return value.encode("utf-8", "replace").decode("utf-8", "replace")


def decode_words(value: str) -> str:
    """Decode RFC 2047 encoded words; unknown charsets and garbage degrade to replacement characters."""
    if "=?" not in value:
        return value
    try:
        pieces = email.header.decode_header(value)
    except Exception:  # the email package raises assorted errors on garbage
        return value
    out = []
    for chunk, charset in pieces:
        if isinstance(chunk, str):
            out.append(chunk)
            continue
        try:
            out.append(chunk.decode(charset or "raw-unicode-escape", "replace"))
        except (LookupError, UnicodeError):
            out.append(chunk.decode("utf-8", "replace"))
    return "".join(out)


def decoded_headers(fields: Iterable[Field]) -> dict[str, tuple[str, ...]]:
    """Every header field by lower-case name, all occurrences in order, RFC 2047 decoded.

    ``fields`` are raw (name, value) pairs, from :func:`raw_header_fields`.
    """
    out: dict[str, list[str]] = {}
    for name, value in fields:
        text = decode_words(_to_text(value)).strip()
        out.setdefault(name.strip().lower(), []).append(text)
    return {k: tuple(v) for k, v in out.items()}


def from_parts(fields: Iterable[Field]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Display names and addresses of the From field(s), from raw (name, value) pairs."""
    names: list[str] = []
    addresses: list[str] = []
    try:
        raws = [_to_text(v) for k, v in fields if k.lower() == "from"]
        for name, address in email.utils.getaddresses(raws):
            if name:
                names.append(decode_words(name))
            if address:
                addresses.append(address)
    except Exception:
        return tuple(names), tuple(addresses)
    return tuple(names), tuple(addresses)


def _extension(filename: str) -> str:
    # Windows ignores trailing dots and spaces: "invoice.exe. " runs as an .exe.
    base = filename.replace("\\", "/").rsplit("/", 1)[-1].rstrip(". \t")
    return base.rpartition(".")[2].lower() if "." in base else ""


def _charset_text(payload: bytes, charset: str | None) -> str:
    try:
        return payload.decode(charset or "utf-8", "replace")
    except (LookupError, UnicodeError):
        return payload.decode("utf-8", "replace")


def _safe(call: Any, default: Any) -> Any:
    try:
        return call()
    except Exception:  # broken MIME: the email package raises many kinds of errors
        return default


def _attachment(part: Message, filename: str, payload: bytes, limits: ZipLimits) -> Attachment:
    detected = sniff(payload)
    listing = None
    if detected == "application/zip" or _extension(filename) == "zip":
        listing = _safe(lambda: zip_listing(payload, limits), None)
    return Attachment(
        filename=filename,
        extension=_extension(filename),
        declared_type=_safe(part.get_content_type, "application/octet-stream"),
        detected_type=detected,
        size=len(payload),
        archive=listing,
    )


def walk_parts(message: bytes, limits: ZipLimits | None = None) -> BodyParts:
    """Walk the MIME tree of ``message`` once: its text parts (still encoded) and attachments."""
    # The fast parser builds the same tree; the email package reads the shapes it leaves alone.
    msg = _safe(lambda: parse_message(message), None)
    if msg is None:  # not "or": a Message without header fields is falsy
        msg = _safe(lambda: email.message_from_bytes(message, policy=email.policy.compat32), None)
    if msg is None:
        return BodyParts((), (), 0, raw=message[:MAX_TEXT].decode("utf-8", "replace"))
    return walk_tree(msg, limits)


def walk_tree(msg: Message, limits: ZipLimits | None = None) -> BodyParts:
    """The text parts and attachments of a parsed MIME tree (compat32 ``Message``). Never raises."""
    limits = limits or ZipLimits()
    texts: list[TextPart] = []
    attachments: list[Attachment] = []
    parts = 0
    for part in _safe(lambda: list(msg.walk())[:MAX_PARTS], [msg]):
        parts += 1
        if _safe(part.is_multipart, False):
            continue
        ctype = _safe(part.get_content_type, "text/plain")
        disposition = _safe(part.get_content_disposition, None)
        filename = decode_words(_safe(part.get_filename, None) or "")
        payload = _safe(lambda p=part: p.get_payload(decode=True), None)
        if not isinstance(payload, bytes):
            payload = b""
        is_text = ctype in ("text/plain", "text/html") and not filename and disposition != "attachment"
        if is_text:
            texts.append(TextPart(payload, _safe(part.get_content_charset, None), ctype == "text/html"))
        elif filename or disposition == "attachment" or not ctype.startswith(("text/", "message/")):
            attachments.append(_attachment(part, filename, payload, limits))
    return BodyParts(tuple(texts), tuple(attachments), parts)


def read_text(parts: BodyParts) -> BodyText:
    """Decode the text parts in order, HTML made visible text, until MAX_TEXT characters."""
    if parts.raw is not None:
        return BodyText(parts.raw, (), ())
    texts: list[str] = []
    markups: list[str] = []
    budget = MAX_TEXT
    for part in parts.texts:
        if budget <= 0:
            break
        text = _charset_text(part.payload[: budget * 4], part.charset)
        if part.html:
            cleaned = strip_scripts(text)
            markups.append(cleaned)
            text = visible_text(cleaned)
        text = text[:budget]
        budget -= len(text)
        texts.append(text)
    return BodyText("\n".join(texts), tuple(texts), tuple(markups))


def find_urls(text: BodyText) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Distinct URLs of the text and of the HTML links, and their distinct host names."""
    links = [link for markup in text.markups for link in html_links(markup)]
    return extract_urls(list(text.texts), links)


def body_facts(msg: Message, limits: ZipLimits | None = None) -> BodyFacts:
    """Every body fact of a parsed MIME tree at once (rules read them lazily, layer by layer)."""
    return _facts(walk_tree(msg, limits))


def parse_body(message: bytes, limits: ZipLimits | None = None) -> BodyFacts:
    """Every body fact of ``message`` at once: text, URLs, attachments. Never raises."""
    return _facts(walk_parts(message, limits))


def _facts(parts: BodyParts) -> BodyFacts:
    text = read_text(parts)
    urls, domains = find_urls(text)
    return BodyFacts(text.text, urls, domains, parts.attachments, parts.parts)
