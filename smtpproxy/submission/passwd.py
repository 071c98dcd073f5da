"""``submission.auth: {passwd_file: PATH}``: user names and password hashes (argon2id or bcrypt).

The file has one ``user:hash`` per line; blank lines and ``#`` comments are
skipped. Hashes are argon2 in its PHC string form (``$argon2id$v=19$...``, as
``argon2-cffi`` and the ``argon2`` tool write) or bcrypt (``$2b$...``, as
``htpasswd -B`` writes). It is read at start and on SIGHUP; a reload that finds
any bad line keeps the old table (and the error names the line).

A user who is not in the file costs a verification against a dummy argon2id
hash, like a wrong password: the time of the answer does not tell whether a user exists.
Verification is slow on purpose (argon2 tens of milliseconds, bcrypt as
configured by its cost): ``verify_async`` runs it in a worker thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from pathlib import Path

import argon2
import bcrypt

log = logging.getLogger("smtpproxy.submission.passwd")

_ARGON2 = ("$argon2id$", "$argon2i$", "$argon2d$")
_BCRYPT = ("$2a$", "$2b$", "$2y$")
_HASHER = argon2.PasswordHasher()
_DUMMY = _HASHER.hash("not a password of anyone")


class PasswdError(ValueError):
    """The file cannot be used; the text names the file and line (never a hash or password)."""


def parse(text: str, source: str) -> dict[str, str]:
    """The table of ``text``: user -> hash; :class:`PasswdError` at the first bad line."""
    users: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        user = user.strip()
        if not sep or not user or any(c.isspace() for c in user):
            raise PasswdError(f"{source}, line {number}: expected user:hash")
        hashed = hashed.strip()
        if not hashed.startswith(_ARGON2 + _BCRYPT):
            raise PasswdError(
                f"{source}, line {number}: expected an argon2id ($argon2id$...) or bcrypt ($2b$...) hash "
                f"for user {user!r}"
            )
        if user in users:
            raise PasswdError(f"{source}, line {number}: user {user!r} is listed twice")
        users[user] = hashed
    return users


def check_password(hashed: str, password: str) -> bool:
    """True when ``password`` matches ``hashed`` (argon2 or bcrypt); False for anything else."""
    try:
        if hashed.startswith(_BCRYPT):
            return bcrypt.checkpw(password.encode(), hashed.encode())
        return _HASHER.verify(hashed, password)
    except (argon2.exceptions.VerificationError, argon2.exceptions.InvalidHashError, ValueError):
        return False


class PasswdFile:
    """The users of a passwd file, loaded at start and on ``reload``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._users: Mapping[str, str] = self._load()

    def _load(self) -> dict[str, str]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except OSError as err:
            raise PasswdError(f"{self.path}: cannot read: {err.strerror}") from None
        except UnicodeDecodeError:
            raise PasswdError(f"{self.path}: expected UTF-8 text") from None
        return parse(text, str(self.path))

    def __len__(self) -> int:
        return len(self._users)

    def reload(self) -> bool:
        """Read the file again (SIGHUP); on a problem keep the old table and log where it is."""
        try:
            users = self._load()
        except PasswdError as err:
            log.error("passwd_file not reloaded, keeping the old one: %s", err)
            return False
        self._users = users
        log.info("passwd_file reloaded", extra={"fields": {"users": len(users)}})
        return True

    def verify(self, user: str, password: str) -> bool:
        """True when ``user`` exists and ``password`` is theirs. Unknown users cost the same time."""
        hashed = self._users.get(user)
        if hashed is None:
            check_password(_DUMMY, password)
            return False
        return check_password(hashed, password)  # the libraries compare digests in constant time

    async def verify_async(self, user: str, password: str) -> bool:
        """``verify`` in a worker thread (a hash takes tens of milliseconds)."""
        return await asyncio.to_thread(self.verify, user, password)
