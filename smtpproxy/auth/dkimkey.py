"""DKIM public keys: parsed once per record, verified with OpenSSL.

dkimpy parses the key record (tag list, base64, two ASN.1 passes) on every
verification and checks RSA signatures with Python's ``pow``: together about
0.3 ms of a 0.7 ms RSA-2048 verification. :class:`KeyCache` keeps what
``dkim.evaluate_pk`` made of a record, plus an OpenSSL key object built from
the same modulus and exponent, so a warm verification costs one OpenSSL call
(~0.03 ms).

:func:`rsa_verify` gives exactly dkimpy's answer: dkimpy works on the signature
as a number, so a signature with leading zero bytes missing, or one at or above
the modulus, verifies there as its value modulo n; we hand OpenSSL that same
value as a full-length octet string (RFC 8017 §8.2.2 would call both invalid;
agreeing with dkimpy is what keeps results unchanged). Keys OpenSSL does not
take (tiny or huge moduli, odd exponents) are verified with dkimpy's own code.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import Any

import dkim
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa, utils
from dkim import crypto

# OpenSSL's RSA limits: moduli up to 16384 bits; exponents above 64 bits only
# for moduli up to 3072 bits. Below 1024 bits dkimpy may raise "digest too large"
# where OpenSSL would just say "invalid": keep dkimpy there too.
_OPENSSL_MIN_BITS = 1024
_OPENSSL_MAX_BITS = 16384
_OPENSSL_MAX_EXPONENT = 1 << 64
_HASHES: dict[bytes, type[hashes.HashAlgorithm]] = {b"rsa-sha1": hashes.SHA1, b"rsa-sha256": hashes.SHA256}
_REVOKED = re.compile(rb"(^|;)\s*p\s*=\s*(;|$)")


@dataclass(frozen=True, slots=True)
class DkimKey:
    """A key record as dkimpy's ``evaluate_pk`` read it, plus an OpenSSL key when one applies.

    ``pk`` is dkimpy's key (a dict with modulus and publicExponent for RSA, a
    nacl VerifyKey for Ed25519); ``ktag`` b"rsa" or b"ed25519"; ``tlsrpt`` whether
    the record is limited to TLS reports (s=tlsrpt).
    """

    pk: Any
    keysize: int
    ktag: bytes
    tlsrpt: bool
    openssl: rsa.RSAPublicKey | None


def _openssl_key(pk: Any, keysize: int) -> rsa.RSAPublicKey | None:
    n, e = pk["modulus"], pk["publicExponent"]
    if not _OPENSSL_MIN_BITS <= keysize <= _OPENSSL_MAX_BITS or e >= _OPENSSL_MAX_EXPONENT:
        return None
    try:
        return rsa.RSAPublicNumbers(e, n).public_key()
    except (ValueError, UnsupportedAlgorithm):
        return None  # e.g. an even exponent: dkimpy's arithmetic still gives its answer


def parse_key(name: str, record: bytes) -> DkimKey | str:
    """The key in ``record`` (a TXT record for ``name``), or why it is unusable (short text)."""
    try:
        pk, keysize, ktag, tlsrpt = dkim.evaluate_pk(name, record)
    except Exception as err:
        return "key revoked" if _REVOKED.search(record) else f"bad key record: {err}"[:100]
    openssl = _openssl_key(pk, keysize) if ktag == b"rsa" else None
    return DkimKey(pk, keysize, ktag, bool(tlsrpt), openssl)


class KeyCache:
    """Parsed keys by (name, record bytes), at most ``size`` of them, oldest dropped first.

    Keyed by the record itself, so a key that changed in DNS is simply a new entry.
    Safe to share between the event loop and a verification thread: a race can
    only parse a record twice or drop an entry early.
    """

    def __init__(self, size: int = 256) -> None:
        self.size = size
        self._keys: dict[tuple[str, bytes], DkimKey | str] = {}

    def get(self, name: str, record: bytes) -> DkimKey | str:
        """The parsed key (or the reason it is unusable) for ``record`` at ``name``."""
        cache_key = (name, record)
        found = self._keys.get(cache_key)
        if found is not None:
            return found
        parsed = parse_key(name, record)
        if len(self._keys) >= self.size:
            # KeyError & co.: another thread evicted or resized at the same moment.
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                del self._keys[next(iter(self._keys))]
        self._keys[cache_key] = parsed
        return parsed

    def __len__(self) -> int:
        return len(self._keys)


def rsa_verify(key: DkimKey, algorithm: bytes, digest: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is a valid RSASSA-PKCS1-v1_5 signature of ``digest`` (same answer as dkimpy).

    ``algorithm`` is the signature's a= value (rsa-sha256 or rsa-sha1), which
    names the hash that produced ``digest``.
    """
    if key.openssl is None:
        return bool(crypto.RSASSA_PKCS1_v1_5_verify(_Digest(algorithm, digest), signature, key.pk))
    n = key.pk["modulus"]
    value = int.from_bytes(signature, "big")
    if value >= n:
        value %= n
    octets = value.to_bytes((n.bit_length() + 7) // 8, "big")
    try:
        key.openssl.verify(octets, digest, padding.PKCS1v15(), utils.Prehashed(_HASHES[algorithm]()))
    except InvalidSignature:
        return False
    return True


class _Digest:
    """A finished hash in the shape dkimpy's RSA code reads (``name``, ``digest()``)."""

    def __init__(self, algorithm: bytes, digest: bytes) -> None:
        self.name = algorithm.split(b"-", 1)[1].decode("ascii")
        self._digest = digest

    def digest(self) -> bytes:
        return self._digest
