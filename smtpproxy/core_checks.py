"""The checks every proxy runs: no open relay, and the message/recipient limits.

Both are protective (``Check.protective``): an accept rule or an allow-list
ends filtering, never these.
"""

from __future__ import annotations

import ipaddress

from smtpproxy.config import LimitsConfig
from smtpproxy.headers import sanitize
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.stages import Check, CheckOutcome
from smtpproxy.verdict import Action, Reply, Verdict

# The characters that make a local part route onward: the percent hack
# (user%host@relay), UUCP bang paths (host!user@relay) and a quoted "@"
# ("user@host"@relay). Postfix honours them for clients it trusts, and it
# trusts the proxy: passed on, they would relay through the backend.
ROUTING_CHARACTERS = frozenset("%!@")


def domain_matches(domain: str, relay_domains: frozenset[str]) -> bool:
    """True when ``domain`` is relayed: listed exactly, or under a listed ``.parent`` entry."""
    if domain in relay_domains:
        return True
    labels = domain.split(".")
    return any("." + ".".join(labels[i:]) in relay_domains for i in range(1, len(labels)))


def local_part(address: str) -> str:
    """The local part of ``address`` as the backend reads it: unquoted, backslash escapes resolved."""
    local = address.rpartition("@")[0] if "@" in address else address
    if len(local) >= 2 and local[0] == local[-1] == '"':
        inner = local[1:-1]
        out: list[str] = []
        escaped = False
        for ch in inner:
            if escaped or ch != "\\":
                out.append(ch)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return local


def routes(address: str) -> bool:
    """True when the local part of ``address`` asks to be routed onward (``%``, ``!`` or ``@``)."""
    return not ROUTING_CHARACTERS.isdisjoint(local_part(address))


class RelayCheck(Check):
    """Recipients outside ``relay_domains`` get 550 5.7.1 and never reach the backend.

    An entry ``example.org`` matches that domain only; ``.example.org`` matches
    its subdomains (Postfix's convention). An empty list relays nothing.
    Clients in ``relay_networks`` (Postfix's ``mynetworks``) may send to any
    domain, and so may authenticated clients (AUTH on the submission port). Local parts that route (see ``ROUTING_CHARACTERS``) are refused for
    every client and every domain (Postfix's ``allow_untrusted_routing = no``,
    applied to all: the backend trusts the proxy, so it would route them).
    """

    name = "relay"
    pure = True
    timed = False
    protective = True

    def __init__(self, relay_domains: list[str], relay_networks: list[str] | None = None) -> None:
        self.relay_domains = frozenset(relay_domains)
        self.relay_networks = tuple(ipaddress.ip_network(n, strict=False) for n in relay_networks or ())

    def may_relay(self, session: Session) -> bool:
        """True when the client is in ``relay_networks``."""
        ip = session.client_ip
        return any(ip in net for net in self.relay_networks)

    async def rcpt(self, session: Session, txn: Transaction, rcpt: Recipient) -> CheckOutcome:
        if routes(rcpt.address):
            return Verdict(
                Action.REJECT,
                Reply(550, "5.7.1", f"<{sanitize(rcpt.address, limit=200)}>: Routed addresses not accepted"),
                reasons=("routed_address",),
            )
        if session.auth_user is not None:
            return None  # an authenticated submission client may send anywhere (RFC 6409)
        domain = rcpt.domain.rstrip(".")
        if (domain.startswith("[") or not domain_matches(domain, self.relay_domains)) and not (
            self.relay_networks and self.may_relay(session)
        ):
            return Verdict(
                Action.REJECT,
                Reply(550, "5.7.1", f"<{sanitize(rcpt.address, limit=200)}>: Relay access denied"),
                reasons=("relay_denied",),
            )
        return None


class LimitsCheck(Check):
    """Messages per connection (at MAIL) and recipients per message (at RCPT)."""

    name = "limits"
    pure = True
    timed = False
    protective = True

    def __init__(self, limits: LimitsConfig, max_messages: int | None = None) -> None:
        self.limits = limits
        # Config.max_messages_per_connection: the one setting, whichever spelling set it.
        self.max_messages = max_messages if max_messages is not None else limits.max_messages_per_connection

    async def mail(self, session: Session, txn: Transaction) -> CheckOutcome:
        if session.transactions >= self.max_messages:
            if self.limits.messages_per_connection_action == "tempfail":
                return Verdict(
                    Action.TEMPFAIL,
                    Reply(450, "4.7.1", "Too many messages in this connection, try again later"),
                    reasons=("messages_per_connection",),
                )
            return Verdict(
                Action.TEMPFAIL,
                Reply(421, "4.7.0", "Too many messages in this connection, closing"),
                reasons=("messages_per_connection",),
                disconnect=True,
            )
        return None

    async def rcpt(self, session: Session, txn: Transaction, rcpt: Recipient) -> CheckOutcome:
        if len(txn.recipients) >= self.limits.max_recipients:
            return Verdict(
                Action.TEMPFAIL,
                Reply(452, "4.5.3", "Too many recipients"),
                reasons=("too_many_recipients",),
            )
        return None
