"""``submission.sender_login``: which addresses each user may send as (Postfix's smtpd_sender_login_maps).

The file has one user per line: ``user: address-or-domain ...`` (commas or
spaces between them). ``alice@example.org`` allows that address, ``example.org``
or ``@example.org`` every address of that domain. Matching ignores case. MAIL
FROM and the header From must both be allowed (553 5.7.1 otherwise), so a
compromised account cannot send as someone else. The null sender ``<>``
(bounces, read receipts) is allowed for every user.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("smtpproxy.submission")

_SPLIT = re.compile(r"[\s,]+")


class SenderLoginError(ValueError):
    """The file cannot be used; the text names the file and the line."""


@dataclass(frozen=True, slots=True)
class Allowed:
    """What one user may send as."""

    addresses: frozenset[str]
    domains: frozenset[str]

    def permits(self, address: str) -> bool:
        """True when ``address`` (not the null sender) is one of these."""
        lowered = address.lower()
        return lowered in self.addresses or lowered.rpartition("@")[2] in self.domains


def parse(text: str, source: str) -> dict[str, Allowed]:
    """The table of ``text``: user (lower-case) -> what they may send as."""
    table: dict[str, Allowed] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        user, sep, rest = line.partition(":")
        items = [i for i in _SPLIT.split(rest.strip().lower()) if i]
        if not sep or not user.strip() or not items:
            raise SenderLoginError(f"{source}, line {number}: expected 'user: address-or-domain ...'")
        addresses, domains = set(), set()
        for item in items:
            if item.startswith("@"):
                item = item[1:]
            if "@" in item:
                addresses.add(item)
            elif "." in item:
                domains.add(item.rstrip("."))
            else:
                raise SenderLoginError(
                    f"{source}, line {number}: expected an address or a domain, got {item!r}"
                )
        key = user.strip().lower()
        previous = table.get(key)
        if previous is not None:
            addresses |= previous.addresses
            domains |= previous.domains
        table[key] = Allowed(frozenset(addresses), frozenset(domains))
    return table


class SenderLogin:
    """The sender_login table, loaded at start and on ``reload``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._table: Mapping[str, Allowed] = self._load()

    def _load(self) -> dict[str, Allowed]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as err:
            raise SenderLoginError(f"{self.path}: cannot read: {err.strerror}") from None
        except UnicodeDecodeError:
            raise SenderLoginError(f"{self.path}: expected UTF-8 text") from None
        return parse(text, str(self.path))

    def reload(self) -> bool:
        """Read the file again (SIGHUP); a bad file keeps the old table."""
        try:
            table = self._load()
        except SenderLoginError as err:
            log.error("sender_login not reloaded, keeping the old one: %s", err)
            return False
        self._table = table
        return True

    def permits(self, user: str, address: str) -> bool:
        """True when ``user`` may send as ``address``; the null sender is always allowed."""
        if not address:
            return True
        allowed = self._table.get(user.lower())
        return allowed is not None and allowed.permits(address)
