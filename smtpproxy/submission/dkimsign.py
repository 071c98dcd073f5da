"""Outbound DKIM signing (RFC 6376; RFC 8463 dual signing with RSA-SHA256 and Ed25519) with dkimpy.

Keys are read once, at start and on SIGHUP (``reload``), never per message; a
reload that finds any key unusable keeps every old key (a half-rotated domain
would sign with a selector whose record may not be published yet).

What is signed: relaxed/relaxed (survives the header refolding and trailing
whitespace changes of relays), the header fields in ``SIGNED_HEADERS`` that the
message has, and ``OVERSIGNED`` ones once more than they occur, so that nobody
can add a second From, To or Subject that some readers would show (RFC 6376
§8.15). Every key of the header From's domain signs: with an RSA and an Ed25519
key, receivers that know Ed25519 verify that, the others the RSA one.

CPU: body canonicalisation and hashing are linear in the size; as for
verification, messages above ``inline_max_bytes`` are signed in a worker
thread so other sessions keep being served.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import dkim

from smtpproxy.auth.dkim import DKIMPY_LOG, INLINE_MAX_BYTES
from smtpproxy.config.submission import DkimSignKey
from smtpproxy.submission.dkimkeys import KeyFileError, SigningKey, load_key

log = logging.getLogger("smtpproxy.submission.dkim")

SIGNED_HEADERS = (
    b"from",
    b"sender",
    b"reply-to",
    b"to",
    b"cc",
    b"subject",
    b"date",
    b"message-id",
    b"in-reply-to",
    b"references",
    b"mime-version",
    b"content-type",
    b"content-transfer-encoding",
    b"list-id",
    b"list-unsubscribe",
    b"list-unsubscribe-post",
)
OVERSIGNED = (b"from", b"to", b"subject")

_FIELD_NAME = re.compile(rb"^([!-9;-~]+)[ \t]*:", re.MULTILINE)


class SignerError(Exception):
    """Keys that cannot be loaded; ``problems`` has one line per ``dkim_sign[i].key``."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def header_names(message: bytes) -> list[bytes]:
    """The field names of the header, lower-cased, in order (continuation lines skipped)."""
    end = message.find(b"\r\n\r\n")
    head = message if end < 0 else message[: end + 2]
    return [m.group(1).lower() for m in _FIELD_NAME.finditer(head)]


def include_headers(message: bytes) -> list[bytes]:
    """The h= list for ``message``: the signed fields it has, the oversigned ones one extra time."""
    names = header_names(message)
    present = [n for n in names if n in SIGNED_HEADERS]
    extra = list(OVERSIGNED)
    if b"from" not in present:
        present.append(b"from")  # dkimpy insists; a message without From is signed with an empty one
        extra.remove(b"from")
    return present + extra


def load_keys(
    entries: Sequence[DkimSignKey], resolve: Callable[[Path], Path]
) -> dict[str, tuple[SigningKey, ...]]:
    """Every key, by domain; :class:`SignerError` names each entry that cannot be used."""
    keys: dict[str, list[SigningKey]] = {}
    problems = []
    for i, entry in enumerate(entries):
        path = resolve(entry.key)
        try:
            key = load_key(path, entry.domain, entry.selector)
        except OSError as err:
            problems.append(
                f"dkim_sign[{i}].key: expected a readable key file, got {str(entry.key)!r} ({err.strerror})"
            )
            continue
        except KeyFileError as err:
            problems.append(f"dkim_sign[{i}].key: {err} ({path})")
            continue
        keys.setdefault(entry.domain, []).append(key)
    if problems:
        raise SignerError(problems)
    return {domain: tuple(found) for domain, found in keys.items()}


class DkimSigner:
    """Signs outbound messages with the keys of ``dkim_sign``, by the header From's domain."""

    def __init__(
        self,
        entries: Sequence[DkimSignKey],
        resolve: Callable[[Path], Path] = Path,
        *,
        inline_max_bytes: int = INLINE_MAX_BYTES,
    ) -> None:
        self._entries = tuple(entries)
        self._resolve = resolve
        self.inline_max_bytes = inline_max_bytes
        self._keys: Mapping[str, tuple[SigningKey, ...]] = load_keys(self._entries, resolve)

    @property
    def domains(self) -> frozenset[str]:
        """The domains there are keys for."""
        return frozenset(self._keys)

    def keys(self, domain: str) -> tuple[SigningKey, ...]:
        """The keys that sign for ``domain`` (lower-case), () when none."""
        return self._keys.get(domain, ())

    def reload(self) -> bool:
        """Read every key file again (SIGHUP); on any problem keep all the old keys and log it."""
        try:
            keys = load_keys(self._entries, self._resolve)
        except SignerError as err:
            for problem in err.problems:
                log.error("DKIM signing keys not reloaded, keeping the old ones: %s", problem)
            return False
        self._keys = keys  # one assignment: a message is signed with the old keys or the new, never a mix
        log.info("DKIM signing keys reloaded", extra={"fields": {"keys": sum(map(len, keys.values()))}})
        return True

    def sign(self, message: bytes, domain: str) -> bytes:
        """``message`` with one DKIM-Signature per key of ``domain`` prepended (unchanged without keys)."""
        keys = self._keys.get(domain, ())
        if not keys:
            return message
        headers = include_headers(message)
        fields = []
        for key in keys:
            fields.append(
                dkim.sign(
                    message,
                    key.selector.encode(),
                    key.domain.encode(),
                    key.private,
                    canonicalize=(b"relaxed", b"relaxed"),
                    signature_algorithm=key.algorithm,
                    include_headers=headers,
                    logger=DKIMPY_LOG,
                )
            )
        # In the order of dkim_sign; receivers verify each and one pass suffices (RFC 8463 §6).
        return b"".join(fields) + message

    async def sign_async(self, message: bytes, domain: str) -> bytes:
        """``sign``, in a worker thread for messages above ``inline_max_bytes``."""
        if len(message) <= self.inline_max_bytes:
            return self.sign(message, domain)
        return await asyncio.to_thread(self.sign, message, domain)
