"""What a check or rule may return: an Action, an SMTP Reply, header edits.

Checks record facts (``CheckResult`` in :mod:`smtpproxy.session`) apart from
decisions (``Verdict`` here), the way Haraka keeps results apart from return
codes and rspamd keeps symbols apart from actions.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

_ENHANCED = re.compile(r"^[245]\.\d{1,3}\.\d{1,3}$")


class Action(enum.IntEnum):
    """A decision, ordered by severity: the more severe of two wins a tie."""

    CONTINUE = 0
    ACCEPT = 1
    QUARANTINE = 2
    DISCARD = 3
    TEMPFAIL = 4
    REJECT = 5

    @property
    def is_terminal(self) -> bool:
        """True when the decision ends evaluation of the stage (everything but CONTINUE)."""
        return self is not Action.CONTINUE

    @property
    def word(self) -> str:
        """The lower-case word used in logs, metrics labels and rule files."""
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class Reply:
    """An SMTP reply: ``Reply(550, "5.7.1", "Relaying denied")`` renders ``550 5.7.1 Relaying denied``.

    ``enhanced`` may be empty for replies that carry none (the banner, EHLO).
    Multi-line text (``\\n`` separated) renders as an RFC 5321 multi-line reply.
    """

    code: int
    enhanced: str = ""
    text: str = ""

    def __post_init__(self) -> None:
        if not 200 <= self.code <= 599:
            raise ValueError(f"SMTP reply code must be 200..599, got {self.code}")
        if self.enhanced:
            if not _ENHANCED.match(self.enhanced):
                raise ValueError(f"enhanced status code must look like 5.7.1, got {self.enhanced!r}")
            if self.enhanced[0] != str(self.code)[0]:
                raise ValueError(
                    f"enhanced status {self.enhanced} does not match the class of reply {self.code}"
                )
        if "\r" in self.text or "\x00" in self.text:
            raise ValueError("reply text must not contain CR or NUL")

    @property
    def is_positive(self) -> bool:
        """2xx or 3xx."""
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        """4xx: the client keeps the message and retries."""
        return 400 <= self.code < 500

    @property
    def klass(self) -> str:
        """``2xx``, ``4xx`` or ``5xx`` (a closed set, used as a metrics label)."""
        return f"{self.code // 100}xx"

    def render(self) -> str:
        """The reply as sent on the wire, without the final CRLF."""
        lines = self.text.split("\n") if self.text else [""]
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = []
        for i, line in enumerate(lines):
            sep = " " if i == len(lines) - 1 else "-"
            out.append(f"{self.code}{sep}{prefix}{line}".rstrip())
        return "\r\n".join(out)

    def __str__(self) -> str:
        return self.render()

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Build a Reply from a peer's code and message, splitting off an enhanced code."""
        first, _, _rest = message.partition(" ")
        text = message
        enhanced = ""
        if _ENHANCED.match(first) and first[0] == str(code)[0]:
            enhanced = first
            text = message[len(first) + 1 :]
            # Continuation lines repeat the enhanced code; keep it once.
            text = "\n".join(
                line[len(first) + 1 :] if line.startswith(first + " ") else line for line in text.split("\n")
            )
        text = text.replace("\r", "").replace("\x00", "")
        return cls(code, enhanced, text)


class HeaderEditKind(enum.Enum):
    """What a header edit does."""

    ADD = "add"  # prepend a new header field at the top
    REMOVE = "remove"  # remove every field of that name
    SUBJECT_TAG = "subject_tag"  # prepend text to the Subject


@dataclass(frozen=True, slots=True)
class HeaderEdit:
    """A change to the message header made before delivery."""

    kind: HeaderEditKind
    name: str
    value: str = ""


@dataclass(frozen=True, slots=True)
class Verdict:
    """A decision of a check or rule.

    ``reply`` is the SMTP reply for terminal actions that answer the client
    (REJECT, TEMPFAIL); None means the stage's default reply for the action.
    ``reasons`` are short words from a closed set (check or rule names), used
    in logs and as metric labels.
    """

    action: Action = Action.CONTINUE
    reply: Reply | None = None
    header_edits: tuple[HeaderEdit, ...] = ()
    reasons: tuple[str, ...] = ()
    score: float = 0.0
    disconnect: bool = False
    quarantine_to: str | None = None

    @property
    def is_terminal(self) -> bool:
        """True when evaluation of the stage stops here."""
        return self.action.is_terminal


@dataclass(slots=True)
class StageOutcome:
    """The combined outcome of running every check of one stage."""

    action: Action = Action.CONTINUE
    reply: Reply | None = None
    reasons: list[str] = field(default_factory=list)
    header_edits: list[HeaderEdit] = field(default_factory=list)
    score: float = 0.0
    disconnect: bool = False
    quarantine_to: str | None = None
    decided_by: str = ""


CONTINUE = Verdict()


def reject(code: int, enhanced: str, text: str, reason: str, *, disconnect: bool = False) -> Verdict:
    """A REJECT (5xx) or TEMPFAIL (4xx) verdict with its reply; the action follows the code."""
    action = Action.TEMPFAIL if 400 <= code < 500 else Action.REJECT
    return Verdict(action, Reply(code, enhanced, text), reasons=(reason,), disconnect=disconnect)
