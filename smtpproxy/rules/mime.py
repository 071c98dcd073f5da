"""The facts rules look at in a message: decoded headers, body text, URLs, attachments.

Parsed at most once per transaction and cached in ``txn.extras`` (headers and
body separately, so header-only rules never pay for the body). Broken MIME
never raises: every step is guarded and degrades to "less text".
"""

from __future__ import annotations

import email
import email.header
import email.policy
import email.utils
import html
import re
from dataclasses import dataclass
from email.message import Message
from typing import Any
from urllib.parse import urlsplit

import re2

from smtpproxy.rules.archive import ZipLimits, ZipListing, sniff, zip_listing

MAX_TEXT = 1_000_000  # characters of body text kept for rules (all text parts together)
MAX_HTML = 2_000_000  # characters of one HTML part converted to text
MAX_PARTS = 256  # MIME parts walked
MAX_URLS = 1000


def _url_options() -> Any:
    options = re2.Options()
    options.case_sensitive = False
    return options


# RE2: Python's re needs ~1 ms per 15 KB for this case-insensitive alternation, RE2 ~0.05 ms.
_URL = re2.compile(r"""(?:https?|ftp)://[^\s<>"'`{}|\\^\[\]]+|\bwww\.[^\s<>"'`{}|\\^\[\]]+""", _url_options())
_HREF = re.compile(r"""\b(?:href|src)\s*=\s*(?:"([^"]*)"|'([^']*)'|([^\s>"']+))""", re.IGNORECASE)
# [^<>] keeps the scan linear: an unclosed '<' stops at the next '<'.
_TAG = re.compile(r"<[^<>]*>")
_SPACES = re.compile(r"[ \t\r\f\v]+")
_TRAILING = ".,;:!?)]}'\""


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


def decoded_headers(msg: Any) -> dict[str, tuple[str, ...]]:
    """Every header field by lower-case name, all occurrences in order, RFC 2047 decoded."""
    out: dict[str, list[str]] = {}
    try:
        items = list(msg.raw_items())
    except Exception:
        return {}
    for name, value in items:
        text = decode_words(_to_text(str(value))).strip()
        out.setdefault(str(name).strip().lower(), []).append(text)
    return {k: tuple(v) for k, v in out.items()}


def from_parts(msg: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Display names and addresses of the From field(s)."""
    names: list[str] = []
    addresses: list[str] = []
    try:
        raws = [_to_text(str(v)) for k, v in msg.raw_items() if str(k).lower() == "from"]
        for name, address in email.utils.getaddresses(raws):
            if name:
                names.append(decode_words(name))
            if address:
                addresses.append(address)
    except Exception:
        return tuple(names), tuple(addresses)
    return tuple(names), tuple(addresses)


def html_to_text(markup: str) -> tuple[str, list[str]]:
    """Visible text of an HTML document and the targets of its href/src attributes (linear time)."""
    markup = markup[:MAX_HTML]
    low = markup.lower()
    kept: list[str] = []
    pos = 0
    while pos < len(markup):
        starts = [i for i in (low.find("<script", pos), low.find("<style", pos)) if i >= 0]
        if not starts:
            kept.append(markup[pos:])
            break
        start = min(starts)
        kept.append(markup[pos:start])
        tag = "</script" if low.startswith("<script", start) else "</style"
        end = low.find(tag, start)
        close = low.find(">", end) if end >= 0 else -1
        pos = close + 1 if close >= 0 else len(markup)
    cleaned = "".join(kept)
    links = [a or b or c for a, b, c in _HREF.findall(cleaned)]
    text = html.unescape(_TAG.sub(" ", cleaned))
    return _SPACES.sub(" ", text), [html.unescape(link).strip() for link in links]


def _domain(url: str) -> str:
    target = url if "://" in url else "http://" + url
    try:
        host = urlsplit(target).hostname or ""
    except ValueError:
        return ""
    return host.rstrip(".").lower()


def extract_urls(texts: list[str], links: list[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Distinct URLs from plain text and link targets, and their distinct domains."""
    urls: dict[str, None] = {}
    for link in links:
        if link.lower().startswith(("http://", "https://", "ftp://", "www.")):
            urls.setdefault(link, None)
    for text in texts:
        if "://" not in text and "www." not in text.lower():
            continue
        for found in _URL.findall(text):
            if len(urls) >= MAX_URLS:
                break
            urls.setdefault(str(found).rstrip(_TRAILING), None)
    kept = list(urls)[:MAX_URLS]
    domains = dict.fromkeys(d for d in (_domain(u) for u in kept) if d)
    return tuple(kept), tuple(domains)


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


def parse_body(message: bytes, limits: ZipLimits | None = None) -> BodyFacts:
    """Walk the MIME tree once: text of text parts, URLs, attachments. Never raises."""
    limits = limits or ZipLimits()
    msg = _safe(lambda: email.message_from_bytes(message, policy=email.policy.compat32), None)
    if msg is None:
        return BodyFacts(message[:MAX_TEXT].decode("utf-8", "replace"), (), (), (), 0)
    texts: list[str] = []
    links: list[str] = []
    attachments: list[Attachment] = []
    budget = MAX_TEXT
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
        if not is_text:
            if filename or disposition == "attachment" or not ctype.startswith(("text/", "message/")):
                attachments.append(_attachment(part, filename, payload, limits))
            continue
        if budget <= 0:
            continue
        text = _charset_text(payload[: budget * 4], _safe(part.get_content_charset, None))
        if ctype == "text/html":
            text, found = html_to_text(text)
            links.extend(found)
        text = text[:budget]
        budget -= len(text)
        texts.append(text)
    urls, domains = extract_urls(texts, links)
    return BodyFacts("\n".join(texts), urls, domains, tuple(attachments), parts)
