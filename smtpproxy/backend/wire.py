"""The wire side of backend SMTP: content encoding, xtext, and what a transport failure means."""

from __future__ import annotations

import re
import ssl

from aiosmtplib.errors import SMTPConnectTimeoutError, SMTPServerDisconnected, SMTPTimeoutError

from smtpproxy.backend import (
    DROPPED,
    GARBLED,
    IDENTITY_REFUSED,
    TIMED_OUT,
    TLS_FAILED,
    TLS_REQUIRED,
    UNREACHABLE,
)
from smtpproxy.verdict import Reply

_BARE_LINE_END = re.compile(rb"\r\n|\r(?!\n)|\n")


def xtext(value: str) -> str:
    """RFC 3461 xtext, as XCLIENT and XFORWARD attribute values require."""
    out = []
    for byte in value.encode("utf-8", "surrogateescape"):
        if 33 <= byte <= 126 and byte not in (ord("+"), ord("=")):
            out.append(chr(byte))
        else:
            out.append(f"+{byte:02X}")
    return "".join(out)


class StartTlsFailed(Exception):
    """The backend offered STARTTLS and the upgrade failed."""


class TlsRequired(Exception):
    """``require_tls`` is set and the backend did not offer STARTTLS (stripped, or never there)."""


class IdentityRefused(Exception):
    """``forward_client`` is set and the backend does not offer or refused XCLIENT/XFORWARD."""


def failure(err: BaseException) -> tuple[str, Reply]:
    """Classify a transport failure: (metrics kind, reply for the client)."""
    if isinstance(err, SMTPConnectTimeoutError):
        return "connect", UNREACHABLE
    if isinstance(err, SMTPTimeoutError | TimeoutError):
        return "timeout", TIMED_OUT
    if isinstance(err, ssl.SSLError | StartTlsFailed):
        return "tls", TLS_FAILED
    if isinstance(err, TlsRequired):
        return "tls_required", TLS_REQUIRED
    if isinstance(err, IdentityRefused):
        return "identity", IDENTITY_REFUSED
    if isinstance(err, SMTPServerDisconnected | ConnectionError):
        return "disconnected", DROPPED
    return "protocol", GARBLED


def wire_parts(message: bytes) -> tuple[bytes, bytes]:
    """``wire_content`` as (content, final dot), written one after the other.

    For the common message that needs no change the content is the message
    itself: no copy of it just to append the final dot.
    """
    crlf = message.count(b"\r\n")
    if (
        message.count(b"\n") == crlf
        and message.count(b"\r") == crlf
        and not message.startswith(b".")
        and b"\n." not in message
        and (not message or message.endswith(b"\r\n"))
    ):
        return message, b".\r\n"
    content = wire_content(message)
    return content[:-3], b".\r\n"


def wire_content(message: bytes) -> bytes:
    """The message as sent after DATA: CRLF line ends, dot-stuffed, with the final dot.

    Bare CR or LF become CRLF (what Postfix's ``smtpd_forbid_bare_newline =
    normalize`` does), so a message cannot smuggle an end-of-data marker that
    the backend would read differently from us. Messages that need neither
    change (nearly all) are not copied or scanned by a regex.
    """
    crlf = message.count(b"\r\n")
    if message.count(b"\n") != crlf or message.count(b"\r") != crlf:
        message = _BARE_LINE_END.sub(b"\r\n", message)
    if message.startswith(b"."):
        message = b"." + message
    if b"\n." in message:
        message = message.replace(b"\n.", b"\n..")
    if message and not message.endswith(b"\r\n"):
        message += b"\r\n"
    return message + b".\r\n"
