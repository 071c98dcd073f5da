"""Rate-limit keys: which facts of a session a limit counts by, and the key text.

Key kinds and the first stage where each is known:

================= ========== ===========================================
kind              from stage value
================= ========== ===========================================
client_ip         connect    the client address (IPv4-mapped IPv6 as IPv4)
client_net        connect    its network: IPv4 /24, IPv6 /64 by default
helo              helo       the HELO/EHLO name, lower-cased
sender            mail       MAIL FROM address, lower-cased; ``<>`` if null
sender_domain     mail       its domain, lower-cased; ``<>`` if null
recipient         rcpt       the RCPT TO address, lower-cased (rcpt only)
recipient_domain  rcpt       its domain, lower-cased (rcpt only)
auth_user         mail       the authenticated (AUTH) user, lower-cased
================= ========== ===========================================

A limit whose key has ``auth_user`` counts authenticated sessions only (per
user on the submission port); unauthenticated ones pass it.

Each kind may also be written as its rule field (``client.ip``,
``mail_from.domain``, ``rcpt.domain``...; see ``FIELD_NAMES``). A combined
key (``key: [client_ip, sender_domain]``) counts each distinct pair
separately. The key text is ``<limit name>:<values joined by |>``; values
longer than 128 characters are replaced by a hash so a hostile HELO or address
cannot make stored keys big. Keys never appear in replies, logs or metrics.
"""

from __future__ import annotations

import hashlib
import ipaddress
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

from smtpproxy.addresses import ip_text
from smtpproxy.session import IPAddress, Recipient, Session, Transaction

STAGE_ORDER = ("connect", "helo", "mail", "rcpt", "data")

# kind -> the first stage where the fact is known.
KEY_KINDS: dict[str, str] = {
    "client_ip": "connect",
    "client_net": "connect",
    "helo": "helo",
    "sender": "mail",
    "sender_domain": "mail",
    "recipient": "rcpt",
    "recipient_domain": "rcpt",
    "auth_user": "mail",
}
# The same facts under the names the rule language gives them (``client.ip``,
# ``mail_from.domain``...): one vocabulary for rules and rate limits. The kinds
# above stay accepted, as configs written before use them.
FIELD_NAMES: dict[str, str] = {
    "client.ip": "client_ip",
    "client.net": "client_net",
    "mail_from": "sender",
    "mail_from.domain": "sender_domain",
    "rcpt": "recipient",
    "rcpt.domain": "recipient_domain",
    "auth.user": "auth_user",
}
# Kinds only known at one stage (one recipient at a time).
RCPT_ONLY = frozenset({"recipient", "recipient_domain"})
# Kinds a concurrency limit may use: known for the whole connection.
CONNECTION_KINDS = frozenset({"client_ip", "client_net"})

_MAX_VALUE = 128


def earliest_stage(kinds: tuple[str, ...]) -> str:
    """The first stage where every kind of a key is known."""
    return max((KEY_KINDS[k] for k in kinds), key=STAGE_ORDER.index, default="connect")


def key_problem(kinds: tuple[str, ...], stage: str) -> str | None:
    """Why a key cannot be built at ``stage``, or None when it can."""
    first = earliest_stage(kinds)
    if STAGE_ORDER.index(stage) < STAGE_ORDER.index(first):
        return f"key {'+'.join(kinds)} is not known before the {first} stage, got on: {stage}"
    if stage != "rcpt" and RCPT_ONLY.intersection(kinds):
        return f"key {'+'.join(kinds)} names a recipient and needs on: rcpt, got on: {stage}"
    return None


@dataclass(frozen=True, slots=True)
class KeySpec:
    """How one limit builds its key: the kinds and the client network prefixes."""

    kinds: tuple[str, ...]
    ipv4_prefix: int = 24
    ipv6_prefix: int = 64


def client_ip(session: Session) -> IPAddress:
    """The client address, IPv4-mapped IPv6 (``::ffff:192.0.2.1``) unwrapped to IPv4."""
    ip = session.client_ip
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_net(ip: IPAddress, prefix: int) -> str:
    """``ip`` masked to ``prefix`` bits, as a network in CIDR form (``192.0.2.0/24``)."""
    bits = ip.max_prefixlen
    masked = int(ip) & (((1 << prefix) - 1) << (bits - prefix))
    if bits == 32:  # most clients: formatted in C, no address object
        return f"{socket.inet_ntop(socket.AF_INET, masked.to_bytes(4, 'big'))}/{prefix}"
    return f"{ipaddress.IPv6Address(masked)}/{prefix}"


@dataclass(slots=True)
class ConnectionKeys:
    """Key values constant for a connection (its address, its network), computed once each."""

    values: dict[tuple[str, int, int], str] = field(default_factory=dict)


def _connection_value(kind: str, spec: KeySpec, session: Session) -> str:
    # Constant for the connection and asked at every stage: computed once.
    cache = session.state.get(ConnectionKeys).values
    ck = (kind, spec.ipv4_prefix, spec.ipv6_prefix)
    value = cache.get(ck)
    if value is None:
        value = cache[ck] = _client_value(kind, spec, session)
    return value


def _client_value(kind: str, spec: KeySpec, session: Session) -> str:
    ip = client_ip(session)
    if kind == "client_ip":
        # The session's own text of the address (formatted once) unless IPv4-mapped.
        return session.client_address if ip is session.client_ip else ip_text(ip)
    return client_net(ip, spec.ipv4_prefix if ip.version == 4 else spec.ipv6_prefix)


def _value(
    kind: str, spec: KeySpec, session: Session, txn: Transaction | None, rcpt: Recipient | None
) -> str:
    if kind in CONNECTION_KINDS:
        return _connection_value(kind, spec, session)
    if kind == "helo":
        return (session.helo or "").lower()
    if kind in ("sender", "sender_domain"):
        if txn is None:
            raise ValueError(f"key {kind} needs a transaction")
        if not txn.mail_from:
            return "<>"
        return txn.mail_from.lower() if kind == "sender" else txn.sender_domain
    if kind == "auth_user":
        if session.auth_user is None:
            raise ValueError("key auth_user needs an authenticated session")
        return session.auth_user.lower()
    if kind in RCPT_ONLY:
        if rcpt is None:
            raise ValueError(f"key {kind} needs a recipient")
        return rcpt.address.lower() if kind == "recipient" else rcpt.domain
    raise ValueError(f"unknown key kind {kind!r}")


KeyFunction = Callable[[Session, "Transaction | None", "Recipient | None"], str]


def compile_key(name: str, spec: KeySpec) -> KeyFunction:
    """The function building the key of limit ``name`` (see :func:`build_key`), made once per limit.

    A key on the client alone (the common connection limits) skips the general
    path: its value is an address or network, short, printable and without ``|``.
    """
    if len(spec.kinds) == 1 and spec.kinds[0] in CONNECTION_KINDS:
        kind, prefix = spec.kinds[0], name + ":"

        def client_key(session: Session, txn: Transaction | None, rcpt: Recipient | None) -> str:
            return prefix + _connection_value(kind, spec, session)

        return client_key

    if len(spec.kinds) == 1:
        only = spec.kinds[0]

        def single_key(session: Session, txn: Transaction | None, rcpt: Recipient | None) -> str:
            return scoped_key(name, _value(only, spec, session, txn, rcpt).replace("|", "%7C"))

        return single_key

    def combined_key(session: Session, txn: Transaction | None, rcpt: Recipient | None) -> str:
        values = [_value(k, spec, session, txn, rcpt).replace("|", "%7C") for k in spec.kinds]
        return scoped_key(name, "|".join(values))

    return combined_key


def build_key(
    name: str,
    spec: KeySpec,
    session: Session,
    txn: Transaction | None = None,
    rcpt: Recipient | None = None,
) -> str:
    """The store key of limit ``name`` for these facts: ``name:value|value``."""
    return compile_key(name, spec)(session, txn, rcpt)


def scoped_key(name: str, value: str) -> str:
    """``name:value`` with long or control-laden values hashed (also for rules' own keys)."""
    if len(value) > _MAX_VALUE or not value.isprintable():
        value = "#" + hashlib.blake2b(value.encode("utf-8", "surrogateescape"), digest_size=16).hexdigest()
    return f"{name}:{value}"
