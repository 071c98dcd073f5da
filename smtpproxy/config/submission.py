"""The sections of the configuration about submission: the listeners, AUTH, sender_login, DKIM signing."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator

from smtpproxy.addresses import parse_hostport
from smtpproxy.config.base import PositiveFloat, Section

# RFC 6376 §3.1: a selector is one or more dot-separated sub-domain labels.
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_SELECTOR = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")
_DOMAIN = re.compile(rf"^{_LABEL}(?:\.{_LABEL})+$")


def valid_domain(value: str) -> str:
    """A signing domain, lower-cased and without the final dot (ValueError naming what is expected)."""
    domain = value.strip().lower().rstrip(".")
    if not _DOMAIN.match(domain):
        raise ValueError(f"expected a domain name like example.org, got {value!r}")
    return domain


def valid_selector(value: str) -> str:
    """A DKIM selector (dot-separated DNS labels), lower-cased."""
    if not _SELECTOR.match(value):
        raise ValueError(f"expected a DKIM selector of letters, digits, '-' and '.', got {value!r}")
    return value.lower()


class DkimSignKey(Section):
    """One signing key: mail whose header From is in ``domain`` is signed with it (RFC 6376, RFC 8463)."""

    domain: str
    selector: str
    key: Path  # PEM private key (RSA or Ed25519), as `smtpproxy dkim keygen` writes it

    @field_validator("domain")
    @classmethod
    def _valid_domain(cls, value: str) -> str:
        return valid_domain(value)

    @field_validator("selector")
    @classmethod
    def _valid_selector(cls, value: str) -> str:
        return valid_selector(value)


class PasswdAuth(Section):
    """AUTH verified here, against a file of ``user:hash`` lines (argon2id or bcrypt)."""

    passwd_file: Path


class BruteForceConfig(Section):
    """Failed AUTH: counted per client IP and per user name; past a limit, 421 4.7.0 and close."""

    # At least 2: the guard asks "is the bucket full" without counting (see submission.bruteforce).
    max_failures_per_ip: Annotated[int, Field(ge=2)] = 10
    max_failures_per_user: Annotated[int, Field(ge=2)] = 10
    period: PositiveFloat = 3600.0  # the failures are counted over this many seconds
    tarpit: Annotated[float, Field(ge=0, le=30)] = 1.0  # seconds before each failure's reply


class SubmissionConfig(Section):
    """The submission listeners (RFC 6409, RFC 8314) and their policy.

    ``auth``: ``backend`` relays the client's AUTH to the backend on a connection
    kept for that session; ``{passwd_file: PATH}`` verifies here.
    ``sender_login``: a file of ``user: address-or-domain ...`` lines; MAIL FROM
    and the header From must be one of them (553 5.7.1).
    ``received_user``: the Received header names the authenticated user.
    """

    listen: str | None = "0.0.0.0:587"
    listen_tls: str | None = None
    auth: Literal["backend"] | PasswdAuth = "backend"
    sender_login: Path | None = None
    received_user: bool = False
    brute_force: BruteForceConfig = BruteForceConfig()

    @field_validator("listen", "listen_tls")
    @classmethod
    def _valid_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
        return value
