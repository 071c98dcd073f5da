"""The rules' typed state on a connection (``SessionRules``; per transaction: ``txnstate``).

Connection-stage rules (connect, HELO) keep one entry per stage, so that a new
HELO/EHLO (after STARTTLS, or a client greeting twice) replaces what the
previous greeting scored instead of adding to it: RFC 3207 §4.2 has the
client's earlier words forgotten.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from smtpproxy.session import Session
from smtpproxy.stages import Stage
from smtpproxy.verdict import HeaderEdit


@dataclass(slots=True)
class SessionStageRules:
    """The score, matches and header edits of one connection stage's rules."""

    score: float = 0.0
    matches: list[dict[str, Any]] = field(default_factory=list)
    edits: list[HeaderEdit] = field(default_factory=list)
    stopped: bool = False


@dataclass(slots=True)
class SessionRules:
    """The rules' state on a connection: each connection stage's entry, and the DNSBL answers."""

    stages: dict[Stage, SessionStageRules] = field(default_factory=dict)
    dnsbl: dict[str, tuple[str, ...]] = field(default_factory=dict)  # zone -> listing records


def session_stages(session: Session) -> dict[Stage, SessionStageRules]:
    """The per-stage entries of ``session`` (connect before helo)."""
    return session.state.get(SessionRules).stages


def start_stage(session: Session, stage: Stage) -> SessionStageRules:
    """A fresh entry for ``stage``, replacing what an earlier run of that stage left."""
    entry = session_stages(session)[stage] = SessionStageRules()
    return entry


def session_score(session: Session) -> float:
    """The score connection-stage rules gave so far."""
    return sum(entry.score for entry in session_stages(session).values())


def session_matches(session: Session) -> list[dict[str, Any]]:
    """The matches of connection-stage rules, in stage order."""
    stages = session_stages(session)
    return [m for stage in (Stage.CONNECT, Stage.HELO) if stage in stages for m in stages[stage].matches]


def session_edits(session: Session) -> list[HeaderEdit]:
    """The header edits of connection-stage rules, in stage order."""
    stages = session_stages(session)
    return [e for stage in (Stage.CONNECT, Stage.HELO) if stage in stages for e in stages[stage].edits]


def session_stopped(session: Session, before: Stage | None = None) -> bool:
    """True when a ``stop`` at a connection stage (earlier than ``before``, when given) ended rules."""
    return any(
        entry.stopped
        for stage, entry in session_stages(session).items()
        if before is None or stage is not before
    )
