"""``smtpproxy check``: one message through the same policy core as the server, without a backend.

Prints a JSON object: the action and reply the client would get, the score,
the rules that matched and why, the authentication results, and the header
fields that delivery would add.
"""

from __future__ import annotations

import ipaddress
import json
from dataclasses import asdict, is_dataclass
from typing import Any

from smtpproxy.app import App
from smtpproxy.config import Config
from smtpproxy.headers import received_header
from smtpproxy.policy import Decision, SessionPolicy
from smtpproxy.replies import NO_VALID_RECIPIENTS, OK
from smtpproxy.session import Session, new_id
from smtpproxy.verdict import HeaderEditKind, Reply

# What the pretended backend answers: every command accepted, as a backend that
# knows every recipient would.
BACKEND_MAIL_OK = Reply(250, "2.1.0", "Ok")
BACKEND_RCPT_OK = Reply(250, "2.1.5", "Ok")


def _plain(value: Any) -> Any:
    if is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in asdict(value).items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    return str(value)


def _refused(decision: Decision, stage: str) -> dict[str, Any]:
    assert decision.reply is not None
    reply = decision.reply
    return {"action": "tempfail" if reply.is_transient else "reject", "stage": stage, "reply": reply.render()}


async def drive(
    policy: SessionPolicy, message: bytes, helo: str, mail_from: str, rcpts: list[str]
) -> tuple[dict[str, Any], list[dict[str, Any]], list[str]]:
    """One session through the policy, a backend that accepts everything pretended.

    Returns what was decided (action, stage, reply, reason), the recipients'
    outcomes and the header fields delivery would add.
    """
    session = policy.session
    decision = await policy.connect()
    if not decision.forward:
        return {**_refused(decision, "connect"), "reason": ""}, [], []
    decision = await policy.helo(helo, esmtp=True)
    if not decision.forward:
        return {**_refused(decision, "helo"), "reason": ""}, [], []
    decision = await policy.mail(mail_from, ())
    if not decision.forward:
        return {**_refused(decision, "mail"), "reason": ""}, [], []
    policy.mail_answered(BACKEND_MAIL_OK)
    rcpt_results: list[dict[str, Any]] = []
    for address in rcpts:
        decision = await policy.rcpt(address, ())
        if decision.forward:
            decision = policy.rcpt_answered(address, (), BACKEND_RCPT_OK)
        if decision.forward:
            rcpt_results.append({"rcpt": address, "action": "continue"})
        else:
            rcpt_results.append({"rcpt": address, **_refused(decision, "rcpt"), "reason": ""})
    txn = policy.txn
    if txn is None or not txn.recipients:
        policy.end("rejected", "rcpt", "no_recipients", NO_VALID_RECIPIENTS)
        return (
            {"action": "reject", "stage": "rcpt", "reply": NO_VALID_RECIPIENTS.render(), "reason": ""},
            rcpt_results,
            [],
        )
    delivery = await policy.data(message)
    decided = {"action": delivery.action.word, "stage": "data", "reason": delivery.reason}
    if delivery.message is None:
        assert delivery.reply is not None
        policy.refused(delivery)
        return {**decided, "reply": delivery.reply.render()}, rcpt_results, []
    headers = [received_header(session, txn, policy.policy.hostname).decode("utf-8", "replace").rstrip()]
    headers += [f"{e.name}: {e.value}" for e in delivery.header_edits if e.kind is HeaderEditKind.ADD]
    policy.delivered(delivery, OK)
    return {**decided, "reply": OK.render()}, rcpt_results, headers


async def run_check(
    config: Config,
    raw_message: bytes,
    *,
    client_ip: str = "127.0.0.1",
    helo: str = "localhost",
    mail_from: str = "",
    rcpts: list[str] | None = None,
) -> dict[str, Any]:
    """Evaluate one message; the returned dict is what the CLI prints."""
    app = App(config)
    try:
        message = raw_message.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
        session = Session(new_id(), ipaddress.ip_address(client_ip), 0, "127.0.0.1", 25)
        if config.dns.reverse_lookup:
            session.rdns = await app.resolver.reverse_name(client_ip)
        policy = app.policy.session(session)
        addresses = rcpts or ["postmaster@" + (config.relay_domains or ["localhost"])[0]]
        decided, rcpt_results, headers_added = await drive(policy, message, helo, mail_from, addresses)
        txn = policy.last
        extras = txn.extras if txn is not None else {}
        return {
            **decided,
            "score": txn.score if txn is not None else 0.0,
            "rules": list(txn.matched_rules) if txn is not None else [],
            "rule_matches": _plain(extras.get("rule_matches", [])),
            "recipients": rcpt_results,
            "spf": _plain(extras.get("spf")),
            "dkim": _plain(extras.get("dkim", [])),
            "dmarc": _plain(extras.get("dmarc")),
            "arc": _plain(extras.get("arc")),
            "headers_added": headers_added,
        }
    finally:
        await app.close_checks()
        await app.resolver.close()


def render(result: dict[str, Any]) -> str:
    """Pretty JSON for the terminal."""
    return json.dumps(result, indent=2, ensure_ascii=False)
