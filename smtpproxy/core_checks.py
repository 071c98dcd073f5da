"""The checks every proxy runs: no open relay, and the message/recipient limits."""

from __future__ import annotations

from smtpproxy.config import LimitsConfig
from smtpproxy.headers import sanitize
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.stages import Check, CheckOutcome
from smtpproxy.verdict import Action, Reply, Verdict


def domain_matches(domain: str, relay_domains: frozenset[str]) -> bool:
    """True when ``domain`` is relayed: listed exactly, or under a listed ``.parent`` entry."""
    if domain in relay_domains:
        return True
    labels = domain.split(".")
    return any("." + ".".join(labels[i:]) in relay_domains for i in range(1, len(labels)))


class RelayCheck(Check):
    """Recipients outside ``relay_domains`` get 550 5.7.1 and never reach the backend.

    An entry ``example.org`` matches that domain only; ``.example.org`` matches
    its subdomains (Postfix's convention). An empty list relays nothing.
    """

    name = "relay"
    pure = True
    timed = False

    def __init__(self, relay_domains: list[str]) -> None:
        self.relay_domains = frozenset(relay_domains)

    async def rcpt(self, session: Session, txn: Transaction, rcpt: Recipient) -> CheckOutcome:
        domain = rcpt.domain.rstrip(".")
        if domain.startswith("[") or not domain_matches(domain, self.relay_domains):
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

    def __init__(self, limits: LimitsConfig) -> None:
        self.limits = limits

    async def mail(self, session: Session, txn: Transaction) -> CheckOutcome:
        if session.transactions >= self.limits.max_messages_per_connection:
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
