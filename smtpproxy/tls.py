"""Inbound TLS: the server context and the certificate's expiry."""

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
