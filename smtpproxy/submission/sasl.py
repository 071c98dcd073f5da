"""SASL PLAIN (RFC 4616) and LOGIN as SMTP AUTH carries them (RFC 4954): pure decoding, no I/O.

The credentials decoded here live only as long as one verification: they are
never logged, never kept on the session (only the user name is, once
verified), and never part of an exception's text.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

MECHANISMS = ("PLAIN", "LOGIN")
# RFC 4954 §4: "334 " followed by base64 of the challenge; LOGIN's are the classic texts.
LOGIN_USER_CHALLENGE = base64.b64encode(b"Username:").decode()
LOGIN_PASSWORD_CHALLENGE = base64.b64encode(b"Password:").decode()
MAX_FIELD = 255  # RFC 4616 §2: at most 255 octets per field


class SaslError(ValueError):
    """The client's SASL data is malformed (answered 501 5.5.2); the text never includes it."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """A user name and password from one AUTH exchange."""

    user: str
    password: str = ""
    authzid: str = ""

    def __repr__(self) -> str:  # a traceback or a debug log must not show the password
        return f"Credentials(user={self.user!r})"


def decode_base64(text: str) -> bytes:
    """One base64 line from the client (RFC 4954: "=" is an empty initial response)."""
    if text == "=":
        return b""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise SaslError("invalid base64") from None


def _text(raw: bytes) -> str:
    if len(raw) > MAX_FIELD:
        raise SaslError("field too long")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise SaslError("not UTF-8") from None
    if any(ord(c) < 32 or ord(c) == 127 for c in text):
        raise SaslError("control characters")
    return text


def plain(response: bytes) -> Credentials:
    """PLAIN: ``authzid NUL authcid NUL passwd``; an authzid other than the user is refused."""
    parts = response.split(b"\0")
    if len(parts) != 3:
        raise SaslError("expected authzid NUL user NUL password")
    authzid, user, password = (_text(p) for p in parts)
    if not user:
        raise SaslError("empty user name")
    if authzid and authzid != user:
        # Acting as another user is a privilege we do not grant.
        raise SaslError("authorization identity differs from the user")
    return Credentials(user, password, authzid)


def login_field(response: bytes) -> str:
    """One LOGIN answer (the user name or the password)."""
    return _text(response)
