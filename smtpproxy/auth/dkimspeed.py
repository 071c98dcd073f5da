"""Linear-time integer conversions for dkimpy's RSA code.

dkimpy converts between byte strings and integers one byte at a time, each
step shifting a growing big integer: quadratic in the key size, about 0.3 ms of
a 0.5 ms RSA-2048 verification. ``install()`` swaps in ``int.from_bytes`` /
``int.to_bytes`` versions with the same results (tests/test_dkim.py compares
them with dkimpy's own on random values), once per process.
"""

from __future__ import annotations

from dkim import crypto


def str2int(s: bytes) -> int:
    """Big-endian bytes to a non-negative integer (dkimpy's ``str2int``)."""
    return int.from_bytes(s, "big")


def int2str(n: int, length: int = -1) -> bytes:
    """A non-negative integer to big-endian bytes (dkimpy's ``int2str``).

    With ``length`` >= 0: exactly ``length`` bytes (zero-padded; higher bytes
    dropped, as dkimpy's loop does). Otherwise the shortest form, at least one byte.
    """
    assert n >= 0
    if length < 0:
        return n.to_bytes(max((n.bit_length() + 7) // 8, 1), "big")
    if length == 0:
        return b""
    return (n & ((1 << (8 * length)) - 1)).to_bytes(length, "big")


ORIGINAL = (crypto.str2int, crypto.int2str)


def install() -> None:
    """Make dkimpy's RSA use the linear-time conversions."""
    crypto.str2int = str2int
    crypto.int2str = int2str
