"""The offline driver of the policy core: one session, no sockets, a backend that accepts everything.

``smtpproxy check`` and ``smtpproxy rules test`` both run a session through
:func:`drive`; what they print is read off the :class:`OfflineResult`. The
pretended backend answers 250 to MAIL, every RCPT and DATA, as a backend that
knows every recipient would, so what is left is what the policy decided.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from smtpproxy.headers import received_header
from smtpproxy.policy.core import Decision, SessionPolicy
from smtpproxy.replies import NO_VALID_RECIPIENTS, OK
from smtpproxy.rules.sessionstate import session_matches
from smtpproxy.session import Transaction
from smtpproxy.verdict import Action, HeaderEdit, HeaderEditKind, Reply


@dataclass(frozen=True, slots=True)
class RecipientResult:
    """What became of one RCPT: accepted (``reply`` None) or refused."""

    address: str
    reply: Reply | None = None


@dataclass(slots=True)
class OfflineResult:
    """What the policy decided for one session.

    ``action``: the policy's word for it (``continue`` is a plain delivery);
    ``stage``: where it was decided; ``reply``: what the client would hear last
    (the pretended backend's 250 for a delivery); ``headers_added``: the header
    fields delivery would add (trace, then the edits that add a field).
    """

    action: Action
    stage: str
    reply: Reply
    reason: str = ""
    recipients: list[RecipientResult] = field(default_factory=list)
    header_edits: tuple[HeaderEdit, ...] = ()
    headers_added: list[str] = field(default_factory=list)
    txn: Transaction | None = None
    rules: list[str] = field(default_factory=list)
    score: float = 0.0


def _refusal(decision: Decision, stage: str) -> OfflineResult:
    reply = decision.reply
    assert reply is not None
    action = Action.TEMPFAIL if reply.is_transient else Action.REJECT
    return OfflineResult(action, stage, reply, decision.reason)


async def _run(
    policy: SessionPolicy, message: bytes, helo: str, mail_from: str, rcpts: list[str]
) -> OfflineResult:
    decision = await policy.connect()
    if not decision.forward:
        return _refusal(decision, "connect")
    decision = await policy.helo(helo, esmtp=True)
    if not decision.forward:
        return _refusal(decision, "helo")
    decision = await policy.mail_here(mail_from, ())
    if not decision.forward:
        return _refusal(decision, "mail")
    recipients: list[RecipientResult] = []
    last_refusal: OfflineResult | None = None
    for address in rcpts:
        decision = await policy.rcpt_here(address, ())
        if decision.forward:
            recipients.append(RecipientResult(address))
            continue
        recipients.append(RecipientResult(address, decision.reply))
        last_refusal = _refusal(decision, "rcpt")
        if decision.disconnect:
            break
    txn = policy.txn
    if txn is None or not txn.recipients:
        # Every recipient refused: the last refusal is what the session came to.
        policy.end("aborted", "rcpt", "no_recipients")
        result = last_refusal or OfflineResult(Action.REJECT, "rcpt", NO_VALID_RECIPIENTS)
        result.recipients = recipients
        return result
    delivery = await policy.data(message)
    result = OfflineResult(delivery.action, "data", OK, delivery.reason, recipients, delivery.header_edits)
    if delivery.message is None:
        assert delivery.reply is not None
        result.reply = delivery.reply
        policy.refused(delivery)
        return result
    trace = received_header(policy.session, txn, policy.policy.hostname).decode("utf-8", "replace").rstrip()
    result.headers_added = [trace]
    result.headers_added += [
        f"{e.name}: {e.value}" for e in delivery.header_edits if e.kind is HeaderEditKind.ADD
    ]
    policy.delivered(delivery, OK)
    return result


async def drive(
    policy: SessionPolicy, message: bytes, *, helo: str, mail_from: str, rcpts: list[str]
) -> OfflineResult:
    """Run one session through ``policy``: connect, EHLO, MAIL, each RCPT, DATA; what was decided."""
    result = await _run(policy, message, helo, mail_from, rcpts)
    txn = result.txn = policy.last
    # Connection-stage rules count too when no transaction took them over
    # (an accept or refusal before MAIL).
    names = [m["rule"] for m in session_matches(policy.session)]
    if txn is not None:
        names += txn.matched_rules
        result.score = txn.score
    result.rules = list(dict.fromkeys(names))
    await policy.disconnect()
    return result
