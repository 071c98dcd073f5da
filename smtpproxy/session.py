"""Session (one client connection) and Transaction (one envelope and its message).

These carry facts; checks read them and add their ``CheckResult`` facts.
Decisions live in :mod:`smtpproxy.verdict`.
"""

from __future__ import annotations

import ipaddress
import random
import time
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from smtpproxy.addresses import ip_text

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def new_id() -> str:
    """A short random id for connections and transactions (log and header friendly).

    48 bits from the ``random`` generator, not ``secrets``: an id needs to be
    unique, not unguessable, and a getrandom() system call per id cost about 2%
    of the CPU per message. The generator is seeded from the OS at start and
    reseeded in forked children, so workers do not repeat each other's ids.
    """
    return f"{random.getrandbits(48):012X}"


T = TypeVar("T")


class CheckStates:
    """Each check's own typed state on a session or transaction, keyed by the state's class.

    A check keeps a dataclass of its own (``SpfResult``, ``DkimResults``, ...):
    ``states.put(result)``, ``states.peek(SpfResult)``. Typed, no string keys,
    and the state's module needs no import here.
    """

    __slots__ = ("_states",)

    def __init__(self) -> None:
        self._states: dict[type[Any], Any] = {}

    def get(self, kind: type[T]) -> T:
        """The state of ``kind``, made with ``kind()`` on first use."""
        found = self._states.get(kind)
        if found is None:
            found = self._states[kind] = kind()
        return cast(T, found)

    def peek(self, kind: type[T]) -> T | None:
        """The state of ``kind`` when some check made it, else None (nothing is made)."""
        return cast("T | None", self._states.get(kind))

    def put(self, value: object) -> None:
        """Keep ``value`` as the state of its class (a check's result, replaced when it runs again)."""
        self._states[type(value)] = value


@dataclass(slots=True)
class SessionResults:
    """Facts checks found at connect or HELO, before any transaction (``session.state``)."""

    results: dict[str, CheckResult] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """What was negotiated on an inbound TLS connection."""

    version: str
    cipher: str
    bits: int


@dataclass(frozen=True, slots=True)
class CheckResult:
    """A fact found by a check: ``CheckResult("spf", "pass", "...")``.

    ``result`` is one of pass/fail/softfail/neutral/none/temperror/permerror/policy
    (or a check's own closed set); ``details`` are key=value facts for headers and rules.
    """

    check: str
    result: str
    details: dict[str, Any] = field(default_factory=dict)
    comment: str = ""


@dataclass(slots=True)
class Session:
    """One client connection: where it came from and what it said so far."""

    id: str
    client_ip: IPAddress
    client_port: int
    local_ip: str
    local_port: int
    started: float = field(default_factory=time.monotonic)
    proxied: bool = False  # client address came from a PROXY protocol header
    rdns: str | None = None  # verified reverse name, None when unknown
    helo: str | None = None
    esmtp: bool = False
    dsn_offered: bool = False  # our last EHLO reply offered DSN (so the backend did)
    tls: TlsInfo | None = None
    transactions: int = 0  # MAIL commands accepted so far
    messages: int = 0  # messages that reached end of DATA
    errors: int = 0
    rejected_recipients: int = 0
    invalid_commands: int = 0
    # The check or rule whose ACCEPT (at connect or HELO) ended filtering for
    # the whole connection; protection still applies (see Check.protective).
    accepted_by: str | None = None
    junk_commands: int = 0  # NOOP, RSET, VRFY, EXPN, HELP, repeated HELO since the last delivery
    # Submission (RFC 6409): the connection came in on a submission listener;
    # the user name and SASL mechanism once AUTH succeeded (never a password).
    submission: bool = False
    auth_user: str | None = None
    auth_mechanism: str | None = None
    state: CheckStates = field(default_factory=CheckStates)  # each check's typed state
    _address: tuple[IPAddress, str] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def client_address(self) -> str:
        """The client IP as text (IPv6 without brackets).

        Asked by logs, headers and checks several times per message: formatted
        once per address (a PROXY header may replace the address after connect).
        """
        cached = self._address
        if cached is None or cached[0] is not self.client_ip:
            cached = self._address = (self.client_ip, ip_text(self.client_ip))
        return cached[1]


@dataclass(frozen=True, slots=True)
class Recipient:
    """An accepted RCPT TO address with its parameters."""

    address: str
    params: tuple[str, ...] = ()

    @property
    def domain(self) -> str:
        """The domain part, lower-cased; empty for a bare local part."""
        return self.address.rpartition("@")[2].lower() if "@" in self.address else ""


@dataclass(slots=True)
class Transaction:
    """One envelope: MAIL FROM, accepted recipients, and the message once received.

    ``mail_from`` is the reverse path without angle brackets; "" for the null sender.
    """

    id: str
    mail_from: str
    mail_params: tuple[str, ...] = ()
    recipients: list[Recipient] = field(default_factory=list)
    message: bytes = b""
    results: dict[str, CheckResult | list[CheckResult]] = field(default_factory=dict)
    score: float = 0.0
    matched_rules: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    accepted_by: str | None = None  # an ACCEPT at MAIL, RCPT or DATA: no more filtering for this envelope
    state: CheckStates = field(default_factory=CheckStates)  # each check's typed state
    mail_reply: str | None = None  # the reply to MAIL FROM (code and enhanced code)
    message_id: str | None = None  # the Message-ID header field's value (sanitised), once DATA came
    queue_id: str | None = None  # the backend's queue id, from its 250 to the end of DATA

    @property
    def sender_domain(self) -> str:
        """The MAIL FROM domain, lower-cased; empty for the null sender."""
        return self.mail_from.rpartition("@")[2].lower() if "@" in self.mail_from else ""

    @property
    def size(self) -> int:
        """Message size in bytes (0 before DATA)."""
        return len(self.message)

    def add_result(self, result: CheckResult, *, many: bool = False) -> None:
        """Record a check's fact; ``many`` keeps a list (several DKIM signatures)."""
        if many:
            existing = self.results.setdefault(result.check, [])
            assert isinstance(existing, list)
            existing.append(result)
        else:
            self.results[result.check] = result
