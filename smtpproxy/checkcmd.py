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
from smtpproxy.auth.results import arc_result, dkim_results, dmarc_result, spf_result
from smtpproxy.config import Config
from smtpproxy.policy.offline import OfflineResult, drive
from smtpproxy.rules.txnstate import rule_matches
from smtpproxy.session import Session, new_id


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


def report(result: OfflineResult) -> dict[str, Any]:
    """The JSON object ``smtpproxy check`` prints for one session's result."""
    txn = result.txn
    recipients = [
        {"rcpt": r.address, "action": "continue"}
        if r.reply is None
        else {
            "rcpt": r.address,
            "action": "tempfail" if r.reply.is_transient else "reject",
            "reply": r.reply.render(),
        }
        for r in result.recipients
    ]
    return {
        "transaction": txn.id if txn is not None else None,
        # The pretended backend has no queue: None unless it named one.
        "queue_id": txn.queue_id if txn is not None else None,
        "message_id": txn.message_id if txn is not None else None,
        "action": result.action.word,
        "stage": result.stage,
        "reply": result.reply.render(),
        "reason": result.reason,
        "score": result.score,
        "rules": result.rules,
        "rule_matches": _plain(rule_matches(txn)),
        "recipients": recipients,
        "spf": _plain(spf_result(txn)) if txn is not None else None,
        "dkim": _plain(dkim_results(txn)) if txn is not None else [],
        "dmarc": _plain(dmarc_result(txn)) if txn is not None else None,
        "arc": _plain(arc_result(txn)) if txn is not None else None,
        "headers_added": result.headers_added,
    }


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
        addresses = rcpts or ["postmaster@" + (config.relay_domains or ["localhost"])[0]]
        result = await drive(
            app.policy.session(session), message, helo=helo, mail_from=mail_from, rcpts=addresses
        )
        return report(result)
    finally:
        await app.close_checks()
        await app.resolver.close()


def render(result: dict[str, Any]) -> str:
    """Pretty JSON for the terminal."""
    return json.dumps(result, indent=2, ensure_ascii=False)
