"""Header editing on raw message bytes: Received, added/removed fields, Subject tags.

The message is never re-parsed and re-serialised: edits splice bytes into the
header block, so everything else stays byte-identical (folding, encodings,
8-bit and UTF-8 content).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from email.utils import format_datetime

from smtpproxy.session import Session, Transaction
from smtpproxy.verdict import HeaderEdit, HeaderEditKind

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_HELO_UNSAFE = re.compile(r"[^A-Za-z0-9.\-_:\[\]\u0080-\U0010ffff]")
_FIELD_NAME = re.compile(r"^[!-9;-~]+$")  # RFC 5322 ftext: printable ASCII except colon
MAX_VALUE = 900


# Characters that would end or escape the comment the user name sits in.
_COMMENT_UNSAFE = str.maketrans("()\\", "???")


def sanitize(value: str, *, limit: int = MAX_VALUE) -> str:
    """Make client-controlled text safe for a header: no CR/LF/control characters, bounded length."""
    clean = _CONTROL.sub("?", value)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def sanitize_hostname(value: str) -> str:
    """A HELO name or rDNS name as a single token: anything unusual becomes '?'."""
    return _HELO_UNSAFE.sub("?", value)[:255] or "unknown"


def _fold(name: str, parts: Iterable[str]) -> bytes:
    """Join pre-split parts into a folded field, one part per line after the first."""
    lines = list(parts)
    text = f"{name}: " + "\r\n\t".join(lines) + "\r\n"
    return text.encode("utf-8", "surrogateescape")


def received_header(
    session: Session,
    txn: Transaction,
    hostname: str,
    now: datetime | None = None,
    *,
    show_user: bool = False,
) -> bytes:
    """The RFC 5321 §4.4 trace field we prepend, as bytes ending with CRLF.

    ``from HELO (RDNS [IP]) by HOST (smtpproxy) with ESMTP[S][A] id ID (TLS details) for <RCPT>; DATE``
    (RFC 3848: ESMTPSA is authenticated over TLS); ``show_user`` adds
    ``(Authenticated sender: USER)`` as Postfix's smtpd_sasl_authenticated_header does.
    The ``for`` clause is given only for a single recipient, as Postfix does, so
    one copy does not disclose the other recipients.
    """
    helo = sanitize_hostname(session.helo or "unknown")
    rdns = sanitize_hostname(session.rdns) if session.rdns else "unknown"
    ip = session.client_address
    ip_literal = f"IPv6:{ip}" if ":" in ip else ip
    protocol = "ESMTP" if session.esmtp else "SMTP"
    if session.tls is not None:
        protocol += "S"
    if session.auth_user is not None and session.esmtp:
        protocol += "A"
    parts = [f"from {helo} ({rdns} [{ip_literal}])"]
    if show_user and session.auth_user is not None:
        user = sanitize(session.auth_user, limit=100).translate(_COMMENT_UNSAFE)
        parts.append(f"(Authenticated sender: {user})")
    parts.append(f"by {hostname} (smtpproxy) with {protocol} id {txn.id}")
    if session.tls is not None:
        t = session.tls
        parts.append(
            f"(using {sanitize(t.version)} with cipher {sanitize(t.cipher)} ({t.bits}/{t.bits} bits))"
        )
    when = format_datetime(now or datetime.now(UTC))
    if len(txn.recipients) == 1:
        rcpt = sanitize(txn.recipients[0].address, limit=320).replace("<", "").replace(">", "")
        parts.append(f"for <{rcpt}>; {when}")
    else:
        parts[-1] += ";"
        parts.append(when)
    return _fold("Received", parts)


def split_header_block(message: bytes) -> bytes:
    """The header block including its CRLFs (``split_header``'s first part, without copying the rest)."""
    if message.startswith(b"\r\n"):
        return b""
    end = message.find(b"\r\n\r\n")
    return message if end < 0 else message[: end + 2]


def split_header(message: bytes) -> tuple[bytes, bytes]:
    """Split into (header block including its CRLFs, rest starting at the blank line)."""
    if message.startswith(b"\r\n"):
        return b"", message
    end = message.find(b"\r\n\r\n")
    if end < 0:
        return message, b""
    return message[: end + 2], message[end + 2 :]


# Where a field ends: a line end (CRLF, CR or LF, as ``bytes.splitlines`` splits
# lines) not followed by a continuation line (SP or HT). Found in C, and the
# fields sliced once each: growing a field line by line (``field += line``) was
# quadratic, and one folded field of 1.6 MB held the event loop for 20 s.
_FIELD_END = re.compile(rb"\r\n(?![ \t])|\r(?![\n \t])|\n(?![ \t])")


def _fields(header: bytes) -> list[bytes]:
    """Header fields, each with its continuation lines and final CRLF (linear in the header size)."""
    fields: list[bytes] = []
    start = 0
    for match in _FIELD_END.finditer(header):
        end = match.end()
        fields.append(header[start:end])
        start = end
    if start < len(header):
        fields.append(header[start:])
    return fields


def header_values(message: bytes, name: str) -> list[str]:
    """Every value of header field ``name``, unfolded, from the raw message (no MIME parsing).

    Used where only one field is needed (DMARC's From): parsing the whole header
    with the email package costs far more.
    """
    wanted = name.lower().encode()
    header = split_header_block(message)
    if wanted not in header.lower():
        return []
    out = []
    for field in _fields(header):
        raw_name, sep, value = field.partition(b":")
        if sep and raw_name.strip().lower() == wanted:
            out.append(value.replace(b"\r\n", b"").strip().decode("utf-8", "replace"))
    return out


def field_name(field: bytes) -> str:
    """The lower-cased name of a raw header field ('' when the line has no colon)."""
    name, sep, _ = field.partition(b":")
    return name.strip().decode("ascii", "replace").lower() if sep else ""


def format_field(name: str, value: str) -> bytes:
    """A header field we add: name validated, value sanitised and folded at spaces near 78 columns."""
    if not _FIELD_NAME.match(name):
        raise ValueError(f"invalid header field name {name!r}")
    words = sanitize(value, limit=4000).split(" ")
    lines: list[str] = []
    current = f"{name}:"
    for word in words:
        if len(current) + 1 + len(word) > 78 and current.strip() != f"{name}:":
            lines.append(current)
            current = "\t" + word
        else:
            current += " " + word
    lines.append(current)
    return ("\r\n".join(lines) + "\r\n").encode("utf-8", "surrogateescape")


def apply_edits(
    message: bytes,
    edits: Iterable[HeaderEdit],
    prepend: bytes = b"",
    drop: Callable[[bytes], bool] | None = None,
) -> bytes:
    """Apply header edits and prepend trace fields; the body and untouched fields stay byte-identical.

    Removals (by name, or every field ``drop(raw_field)`` is true for) apply to
    the incoming fields only, never to the fields we add; additions are
    prepended in the order given, after ``prepend``. The header is split once.
    """
    edits = list(edits)
    if not edits and drop is None:
        return prepend + message
    header = split_header_block(message)
    fields = _fields(header)
    removals = {e.name.lower() for e in edits if e.kind is HeaderEditKind.REMOVE}
    if removals or drop is not None:
        fields = [f for f in fields if field_name(f) not in removals and not (drop is not None and drop(f))]
    tags = [e.value for e in edits if e.kind is HeaderEditKind.SUBJECT_TAG]
    if tags:
        fields = [_tag_subject(f, tags) if field_name(f) == "subject" else f for f in fields]
        if not any(field_name(f) == "subject" for f in fields):
            fields.append(format_field("Subject", " ".join(tags)))
    added = [format_field(e.name, e.value) for e in edits if e.kind is HeaderEditKind.ADD]
    # One join over a view of the body: the message is copied once, not once
    # per "+" (and the body not sliced out first): 24 MB messages in flight
    # each held four copies at the peak.
    return b"".join([prepend, *added, *fields, memoryview(message)[len(header) :]])


def _tag_subject(field: bytes, tags: list[str]) -> bytes:
    name, _, value = field.partition(b":")
    tag = sanitize(" ".join(tags), limit=200).encode("utf-8", "surrogateescape")
    stripped = value.lstrip(b" \t")
    if stripped.startswith(tag):
        return field  # already tagged (a message looping back through us)
    return name + b": " + tag + b" " + stripped


def remove_fields_where(message: bytes, predicate: Callable[[bytes], bool]) -> bytes:
    """Remove the header fields for which ``predicate(raw_field)`` is true."""
    return apply_edits(message, (), drop=predicate)
