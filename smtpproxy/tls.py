"""Inbound TLS: the server context, the certificate's expiry, why a handshake failed."""

from __future__ import annotations

import ssl
from pathlib import Path

from cryptography import x509


def certificate_expiry(path: Path) -> float | None:
    """Unix time at which the first certificate in a PEM file expires; None if unreadable."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return None
    return cert.not_valid_after_utc.timestamp()


def make_tls_context(cert: str, key: str, min_version: str) -> ssl.SSLContext:
    """Server TLS context: TLS 1.2+ (or 1.3), the system's default secure ciphers, no client certs."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3 if min_version == "TLSv1.3" else ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert, key)
    ctx.verify_mode = ssl.CERT_NONE
    ctx.check_hostname = False
    return ctx


# OpenSSL reason codes (``ssl.SSLError.reason``) by what an operator does about them.
_PROTOCOL_VERSION = frozenset(
    {"UNSUPPORTED_PROTOCOL", "VERSION_TOO_LOW", "TLSV1_ALERT_PROTOCOL_VERSION", "NO_PROTOCOLS_AVAILABLE"}
)
_NO_SHARED_CIPHER = frozenset({"NO_SHARED_CIPHER", "SSLV3_ALERT_HANDSHAKE_FAILURE", "NO_CIPHERS_AVAILABLE"})
_NOT_TLS = frozenset({"WRONG_VERSION_NUMBER", "HTTP_REQUEST", "UNKNOWN_PROTOCOL", "RECORD_LAYER_FAILURE"})

HANDSHAKE_FAILURE_REASONS = (
    "protocol_version",
    "no_shared_cipher",
    "certificate",
    "not_tls",
    "closed",
    "timeout",
    "other",
)


def handshake_failure_reason(error: BaseException | None) -> str:
    """A short word (a metric label) for why an inbound TLS handshake failed.

    ``protocol_version``: the client offers only versions below our minimum;
    ``no_shared_cipher``; ``certificate``: the client rejected our certificate
    (unknown CA, expired, wrong name); ``not_tls``: the client sent something
    else after our 220; ``closed``: it went away mid-handshake; ``timeout``.
    """
    if isinstance(error, ssl.SSLEOFError):
        return "closed"
    if isinstance(error, ssl.SSLError):
        reason = error.reason or ""
        if reason in _PROTOCOL_VERSION:
            return "protocol_version"
        if reason in _NO_SHARED_CIPHER:
            return "no_shared_cipher"
        if reason in _NOT_TLS:
            return "not_tls"
        if "CERTIFICATE" in reason or reason.endswith(("_UNKNOWN_CA", "_BAD_CERTIFICATE")):
            return "certificate"
        return "other"
    if isinstance(error, TimeoutError):
        return "timeout"
    if isinstance(error, ConnectionError | EOFError):
        return "closed"
    return "other"
