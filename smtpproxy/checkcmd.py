"""``smtpproxy check``: one message through the same pipeline as the server, without a backend.

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
from smtpproxy.handler import DEFAULT_REJECT, DEFAULT_TEMPFAIL
from smtpproxy.headers import received_header
from smtpproxy.session import Recipient, Session, Transaction, new_id
from smtpproxy.stages import Stage
from smtpproxy.verdict import Action, HeaderEditKind, Reply, StageOutcome


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


def _result(outcome: StageOutcome, stage: Stage) -> dict[str, Any]:
    reply = outcome.reply
    if reply is None:
        reply = DEFAULT_TEMPFAIL if outcome.action is Action.TEMPFAIL else DEFAULT_REJECT
    return {
        "action": outcome.action.word,
        "stage": stage.value,
        "reply": reply.render(),
        "reason": outcome.decided_by,
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
        session = Session(
            new_id(), ipaddress.ip_address(client_ip), 0, "127.0.0.1", 25, helo=helo, esmtp=True
        )
        if config.dns.reverse_lookup:
            session.rdns = await app.resolver.reverse_name(client_ip)
        txn = Transaction(new_id(), mail_from)
        decided: dict[str, Any] | None = None
        outcome = await app.pipeline.run(Stage.CONNECT, session)
        if outcome.action in (Action.REJECT, Action.TEMPFAIL):
            decided = _result(outcome, Stage.CONNECT)
        if decided is None:
            outcome = await app.pipeline.run(Stage.HELO, session)
            if outcome.action in (Action.REJECT, Action.TEMPFAIL):
                decided = _result(outcome, Stage.HELO)
        if decided is None:
            outcome = await app.pipeline.run(Stage.MAIL, session, txn)
            if outcome.action in (Action.REJECT, Action.TEMPFAIL):
                decided = _result(outcome, Stage.MAIL)
        rcpt_results = []
        if decided is None:
            for address in rcpts or ["postmaster@" + (config.relay_domains or ["localhost"])[0]]:
                rcpt = Recipient(address)
                o = await app.pipeline.run(Stage.RCPT, session, txn, rcpt)
                if o.action in (Action.REJECT, Action.TEMPFAIL):
                    rcpt_results.append({"rcpt": address, **_result(o, Stage.RCPT)})
                else:
                    txn.recipients.append(rcpt)
                    rcpt_results.append({"rcpt": address, "action": "continue"})
            if not txn.recipients:
                decided = {
                    "action": "reject",
                    "stage": "rcpt",
                    "reply": "554 5.5.1 No valid recipients",
                    "reason": "",
                }
        headers_added: list[str] = []
        if decided is None:
            txn.message = message
            outcome = await app.pipeline.run(Stage.DATA, session, txn)
            if outcome.action in (Action.REJECT, Action.TEMPFAIL):
                decided = _result(outcome, Stage.DATA)
            else:
                reply = Reply(250, "2.0.0", "Ok")
                decided = {
                    "action": "accept" if outcome.action is Action.CONTINUE else outcome.action.word,
                    "stage": "data",
                    "reply": reply.render(),
                    "reason": outcome.decided_by,
                }
                headers_added.append(
                    received_header(session, txn, config.hostname).decode("utf-8", "replace").rstrip()
                )
                headers_added += [
                    f"{e.name}: {e.value}" for e in outcome.header_edits if e.kind is HeaderEditKind.ADD
                ]
        extras = txn.extras
        return {
            **decided,
            "score": txn.score,
            "rules": list(txn.matched_rules),
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
