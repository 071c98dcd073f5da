"""DKIM signing keys: read from PEM files, turned into what dkimpy signs with, and the TXT record.

One format on disk for both key types: an unencrypted PEM private key (PKCS#8
or, for RSA, PKCS#1), which is what ``openssl genpkey`` and ``smtpproxy dkim
keygen`` write. dkimpy wants RSA keys as PKCS#1 PEM and Ed25519 keys as the
base64 of the 32-byte seed (RFC 8463), so both are converted once, at load.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

# RFC 8301 §3.2: signers MUST use RSA keys of at least 1024 bits, SHOULD use 2048.
MIN_RSA_BITS = 1024


class KeyFileError(ValueError):
    """A key file that cannot be used; the text says why (without any key material)."""


@dataclass(frozen=True, slots=True)
class SigningKey:
    """One loaded key: the algorithm (a=), the private key as dkimpy takes it, the public TXT record."""

    domain: str
    selector: str
    algorithm: bytes  # b"rsa-sha256" or b"ed25519-sha256"
    private: bytes = b""
    txt: str = ""

    def __repr__(self) -> str:  # never print key material in a log or a traceback
        return f"SigningKey({self.selector}._domainkey.{self.domain}, {self.algorithm.decode()})"


def txt_record(public: rsa.RSAPublicKey | ed25519.Ed25519PublicKey) -> str:
    """The DKIM key record (RFC 6376 §3.6.1) to publish at ``selector._domainkey.domain``."""
    if isinstance(public, rsa.RSAPublicKey):
        der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}"
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return f"v=DKIM1; k=ed25519; p={base64.b64encode(raw).decode()}"


def parse_key(data: bytes, domain: str, selector: str) -> SigningKey:
    """A :class:`SigningKey` from PEM bytes; :class:`KeyFileError` for anything else."""
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:
        raise KeyFileError("expected an unencrypted PEM private key, got an encrypted one") from None
    except ValueError:
        raise KeyFileError("expected a PEM private key (RSA or Ed25519)") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise KeyFileError(f"expected an RSA key of at least {MIN_RSA_BITS} bits, got {key.key_size}")
        pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        return SigningKey(domain, selector, b"rsa-sha256", pem, txt_record(key.public_key()))
    if isinstance(key, ed25519.Ed25519PrivateKey):
        seed = key.private_bytes(
            serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
        )
        return SigningKey(
            domain, selector, b"ed25519-sha256", base64.b64encode(seed), txt_record(key.public_key())
        )
    raise KeyFileError(f"expected an RSA or Ed25519 key, got {type(key).__name__.removeprefix('_')}")


def load_key(path: Path, domain: str, selector: str) -> SigningKey:
    """Read and parse the key file at ``path`` (OSError and KeyFileError say what is wrong)."""
    return parse_key(path.read_bytes(), domain, selector)


def generate(kind: str, bits: int = 2048) -> tuple[bytes, str]:
    """A new key of ``kind`` ("rsa" or "ed25519"): its PEM (PKCS#8) and its TXT record."""
    private: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
    if kind == "rsa":
        private = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    elif kind == "ed25519":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise ValueError(f"expected key type rsa or ed25519, got {kind!r}")
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return pem, txt_record(private.public_key())
