"""DKIM/ARC test keys, generated at test time (no private key is ever stored in the repository).

``rsa_key(2048)`` and ``ed25519_key()`` return a :class:`KeyPair` with the private
key in the form dkimpy's signers take and the TXT record to publish at
``selector._domainkey.domain``. ``weak_rsa_key(512)`` builds an RSA key below the
size the cryptography package will generate, for "key too small" tests.
"""

from __future__ import annotations

import base64
import math
import secrets
from dataclasses import dataclass

import dkim
import nacl.encoding
import nacl.signing
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa


@dataclass(frozen=True, slots=True)
class KeyPair:
    """A signing key and its DKIM key record."""

    private: bytes  # PEM (RSA) or base64 seed (Ed25519), as dkim.sign wants it
    algorithm: bytes  # a= for dkim.sign
    txt: str  # "v=DKIM1; k=...; p=..."


def _rsa_testkey(key: rsa.RSAPrivateKey) -> KeyPair:
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return KeyPair(pem, b"rsa-sha256", f"v=DKIM1; k=rsa; p={base64.b64encode(der).decode()}")


def rsa_key(bits: int = 2048) -> KeyPair:
    """A fresh RSA key of ``bits`` (>= 1024)."""
    return _rsa_testkey(rsa.generate_private_key(public_exponent=65537, key_size=bits))


def _probable_prime(bits: int) -> int:
    def is_prime(n: int) -> bool:
        for p in (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37):
            if n % p == 0:
                return n == p
        d, s = n - 1, 0
        while d % 2 == 0:
            d, s = d // 2, s + 1
        for _ in range(40):
            x = pow(secrets.randbelow(n - 3) + 2, d, n)
            if x in (1, n - 1):
                continue
            for _ in range(s - 1):
                x = pow(x, 2, n)
                if x == n - 1:
                    break
            else:
                return False
        return True

    for _ in range(100_000):
        candidate = secrets.randbits(bits) | (1 << (bits - 1)) | 1
        if is_prime(candidate):
            return candidate
    raise RuntimeError("no prime found")


def weak_rsa_key(bits: int = 512) -> KeyPair:
    """An RSA key smaller than cryptography agrees to generate (for the min_key_bits policy)."""
    e = 65537
    for _ in range(1000):
        p, q = _probable_prime(bits // 2), _probable_prime(bits // 2)
        phi = (p - 1) * (q - 1)
        if p != q and math.gcd(e, phi) == 1 and (p * q).bit_length() == bits:
            break
    else:
        raise RuntimeError("no key found")
    d = pow(e, -1, phi)
    numbers = rsa.RSAPrivateNumbers(
        p, q, d, d % (p - 1), d % (q - 1), pow(q, -1, p), rsa.RSAPublicNumbers(e, p * q)
    )
    return _rsa_testkey(numbers.private_key(unsafe_skip_rsa_key_validation=True))


def ed25519_key() -> KeyPair:
    """A fresh Ed25519 key (RFC 8463)."""
    signing = nacl.signing.SigningKey.generate()
    seed = signing.encode(encoder=nacl.encoding.Base64Encoder)
    public = signing.verify_key.encode(encoder=nacl.encoding.Base64Encoder).decode()
    return KeyPair(seed, b"ed25519-sha256", f"v=DKIM1; k=ed25519; p={public}")


def sign(
    message: bytes,
    key: KeyPair,
    *,
    domain: str = "example.org",
    selector: str = "sel",
    canonicalize: tuple[bytes, bytes] = (b"relaxed", b"relaxed"),
    length: bool = False,
    identity: bytes | None = None,
) -> bytes:
    """``message`` with one more DKIM-Signature prepended."""
    header = dkim.sign(
        message,
        selector.encode(),
        domain.encode(),
        key.private,
        identity=identity,
        canonicalize=canonicalize,
        signature_algorithm=key.algorithm,
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
        length=length,
    )
    return bytes(header) + message


def arc_seal(message: bytes, key: KeyPair, *, domain: str, selector: str = "arc", srv_id: str) -> bytes:
    """``message`` with the next ARC set prepended (it needs an A-R field of ``srv_id`` on top)."""
    headers = dkim.arc_sign(
        message,
        selector.encode(),
        domain.encode(),
        key.private,
        srv_id.encode(),
        include_headers=[b"from", b"to", b"subject", b"date", b"message-id"],
    )
    if not headers:
        raise AssertionError("dkim.arc_sign produced no ARC set (missing Authentication-Results?)")
    return b"".join(headers) + message


def message(
    *,
    from_: str = "Alice <alice@example.org>",
    subject: str = "Hello",
    body: str = "Hi Bob,\r\n\r\nThis is a test.\r\n",
    extra_headers: str = "",
) -> bytes:
    """A small RFC 5322 message with CRLF line ends."""
    text = (
        f"{extra_headers}"
        f"From: {from_}\r\n"
        "To: Bob <bob@example.net>\r\n"
        f"Subject: {subject}\r\n"
        "Date: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        "Message-ID: <test-1@example.org>\r\n"
        "\r\n"
        f"{body}"
    )
    return text.encode()
