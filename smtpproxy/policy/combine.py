"""Verdict combining across the stages of one transaction: the one place it is decided.

Within a stage the pipeline combines the checks' verdicts (the first terminal
one wins). Across stages a MAIL or RCPT decision that waits for the message
(discard, quarantine, a tempfail or reject that rules deferred) meets the DATA
outcome here: the most severe wins, an earlier ACCEPT never overrides what the
content decided, and every stage's header edits are kept.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from smtpproxy.verdict import Action, HeaderEdit, StageOutcome


def combine(
    data: StageOutcome,
    mail: StageOutcome | None,
    rcpts: Sequence[StageOutcome] = (),
    accepted_by: str | None = None,
) -> StageOutcome:
    """The outcome of the whole transaction; the inputs are left unchanged.

    ``accepted_by``: the accept (of the session or the transaction) in force,
    which names an otherwise plain delivery. Header edits of earlier decisions
    come before later ones' (a RCPT's before the MAIL's, the MAIL's before the
    content's), as they always have.
    """
    chosen = data
    edits: list[HeaderEdit] = list(data.header_edits)
    for outcome in (mail or StageOutcome(), *rcpts):
        if outcome.action > chosen.action and outcome.action is not Action.ACCEPT:
            chosen = outcome
        edits[:0] = outcome.header_edits
    final = dataclasses.replace(chosen, header_edits=edits, reasons=list(chosen.reasons))
    if final.action is Action.CONTINUE and accepted_by is not None:
        final.action, final.decided_by = Action.ACCEPT, accepted_by
    return final
