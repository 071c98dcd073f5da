"""The rules' typed state on a transaction (``TxnRules``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smtpproxy.rules.ruleset import Rule, RuleSet
from smtpproxy.session import Transaction
from smtpproxy.verdict import HeaderEdit


@dataclass(slots=True)
class TxnRules:
    """The rules' state on a transaction.

    ``ruleset``: captured at MAIL (a reload mid-transaction does not change its
    rules); ``matches``: why each rule matched; ``edits``: header edits decided
    before DATA; ``pending``: a discard or quarantine decided at MAIL or RCPT,
    answered at DATA; ``done``: a stop or a final action ended the rules.
    """

    ruleset: RuleSet | None = None
    matches: list[dict[str, Any]] = field(default_factory=list)
    edits: list[HeaderEdit] = field(default_factory=list)
    pending: Rule | None = None
    done: bool = False


def txn_rules(txn: Transaction) -> TxnRules:
    """The rules' state of ``txn``."""
    return txn.state.get(TxnRules)


def rule_matches(txn: Transaction | None) -> list[dict[str, Any]]:
    """Why each rule of ``txn`` matched ([] before any rule ran)."""
    found = txn.state.peek(TxnRules) if txn is not None else None
    return found.matches if found is not None else []
