"""Rule actions (``then:``): validated at load, turned into one RuleActions value per rule.

Forms (a single action or a list of them)::

    accept | discard | stop | reject | tempfail | quarantine
    {reject: {code: 554, enhanced: "5.7.1", text: "..."}}   {reject: "text only"}
    {tempfail: {...}}  {quarantine: {to: "maildir:/var/quarantine"}}
    {add_header: {name: X-Tag, value: "yes"}}  {remove_header: X-Foo}
    {tag_subject: "[SPAM]"}  {score: 2.5}
    {ratelimit: {key: [mail_from.domain, client.ip], rate: 100/hour, burst: 20, reply: ...}}

A ``ratelimit`` is a conditional tempfail (see :mod:`smtpproxy.rules.rate_action`):
it takes the place of the final action, so a rule has one or the other.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any

from smtpproxy.addresses import parse_hostport
from smtpproxy.ratelimit.gcra import Rate, parse_rate
from smtpproxy.rules.loader import LList, LMap, Problem, describe
from smtpproxy.rules.rate_action import RATELIMIT_KEYS, RateLimitAction, default_reply, key_fields
from smtpproxy.stages import Stage
from smtpproxy.verdict import Action, HeaderEdit, HeaderEditKind, Reply

TERMINAL = {
    "accept": Action.ACCEPT,
    "reject": Action.REJECT,
    "tempfail": Action.TEMPFAIL,
    "discard": Action.DISCARD,
    "quarantine": Action.QUARANTINE,
}
ALL_ACTIONS = (*TERMINAL, "ratelimit", "stop", "add_header", "remove_header", "tag_subject", "score")
DEFAULT_REPLY = {
    "reject": (550, "5.7.1", "Message rejected by policy"),
    "tempfail": (451, "4.7.1", "Message deferred by policy, try again later"),
}
QUARANTINE_HEADER = "X-Smtpproxy-Quarantine"
# Accepting or deferring a message needs one: a quarantine at CONNECT has nothing to hold.
MESSAGE_STAGES = (Stage.MAIL, Stage.RCPT, Stage.DATA)
_HEADER_NAME_CHARS = set(string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~")


@dataclass(frozen=True, slots=True)
class RuleActions:
    """What a rule does when its condition holds."""

    terminal: Action = Action.CONTINUE
    reply: Reply | None = None
    quarantine_to: str | None = None
    edits: tuple[HeaderEdit, ...] = ()
    score: float = 0.0
    stop: bool = False
    words: tuple[str, ...] = ()  # action names, for reports
    ratelimit: RateLimitAction | None = None  # refused: a tempfail with its reply; allowed: go on


class _Builder:
    def __init__(self, file: str, rule: str, stage: Stage, problems: list[Problem]) -> None:
        self.file, self.rule, self.stage, self.problems = file, rule, stage, problems
        self.terminal: str | None = None
        self.reply: Reply | None = None
        self.quarantine_to: str | None = None
        self.edits: list[HeaderEdit] = []
        self.score = 0.0
        self.stop = False
        self.words: list[str] = []
        self.ratelimit: RateLimitAction | None = None
        self.limited = False  # a ratelimit was given (even an invalid one)

    def problem(self, line: int, message: str) -> None:
        self.problems.append(Problem(self.file, line, self.rule, message))

    def add(self, name: str, arg: Any, line: int) -> None:
        if name not in ALL_ACTIONS:
            self.problem(line, f"unknown action {name!r}; expected one of {', '.join(ALL_ACTIONS)}")
            return
        self.words.append(name)
        if name == "ratelimit":
            if self.limited or self.terminal is not None:
                also = "another ratelimit" if self.limited else f"the final action {self.terminal}"
                self.problem(line, f"ratelimit: a rule has one ratelimit and no final action; it has {also}")
                return
            self.limited = True
            self._ratelimit(arg, line)
        elif name in TERMINAL:
            if self.limited:
                self.problem(
                    line, f"{name}: a rule with a ratelimit has no final action (over the limit it tempfails)"
                )
                return
            if self.terminal is not None:
                self.problem(
                    line, f"{name}: a rule has one final action, this one already has {self.terminal}"
                )
                return
            self.terminal = name
            self._terminal(name, arg, line)
        elif name == "stop":
            self._no_argument(name, arg, line)
            self.stop = True
        elif name == "score":
            if isinstance(arg, bool) or not isinstance(arg, int | float):
                self.problem(line, f"score: expected a number like 2.5 or -1, got {describe(arg)}")
                return
            self.score += float(arg)
        elif name == "add_header":
            if not isinstance(arg, dict) or set(arg) != {"name", "value"}:
                self.problem(
                    line, f"add_header: expected {{name: X-Header, value: text}}, got {describe(arg)}"
                )
                return
            if self._header_name(str(arg["name"]), line) and self._header_value(str(arg["value"]), line):
                self.edits.append(HeaderEdit(HeaderEditKind.ADD, str(arg["name"]), str(arg["value"])))
        elif name == "remove_header":
            if isinstance(arg, str) and self._header_name(arg, line):
                self.edits.append(HeaderEdit(HeaderEditKind.REMOVE, arg))
            elif not isinstance(arg, str):
                self.problem(line, f"remove_header: expected a header name, got {describe(arg)}")
        elif name == "tag_subject":
            if not isinstance(arg, str) or not arg.strip() or not self._header_value(arg, line):
                self.problem(line, f"tag_subject: expected a tag like '[SPAM]', got {describe(arg)}")
                return
            self.edits.append(HeaderEdit(HeaderEditKind.SUBJECT_TAG, "Subject", arg))

    def _no_argument(self, name: str, arg: Any, line: int) -> None:
        if arg not in (None, {}, True):
            self.problem(line, f"{name}: takes no value, got {describe(arg)}")

    def _header_name(self, name: str, line: int) -> bool:
        if not name or not set(name) <= _HEADER_NAME_CHARS:
            self.problem(
                line, f"header name {name!r} is invalid; expected letters, digits and '-' like X-Spam-Tag"
            )
            return False
        return True

    def _header_value(self, value: str, line: int) -> bool:
        if any(ord(c) < 32 and c != "\t" for c in value):
            self.problem(
                line, f"header value {value!r} contains control characters (CR/LF); expected one line"
            )
            return False
        return True

    def _terminal(self, name: str, arg: Any, line: int) -> None:
        if name in ("accept", "discard"):
            self._no_argument(name, arg, line)
        if name in ("discard", "quarantine") and self.stage not in MESSAGE_STAGES:
            self.problem(
                line, f"{name} needs a message; expected stage mail, rcpt or data, not {self.stage.value}"
            )
        if name in DEFAULT_REPLY:
            self._reply(name, arg, line)
        elif name == "quarantine":
            self._quarantine(arg, line)

    def _reply(self, name: str, arg: Any, line: int) -> None:
        want = "5" if name == "reject" else "4"
        reply = self._parse_reply(name, arg, line, DEFAULT_REPLY[name], want)
        if reply is not None:
            self.reply = reply

    def _parse_reply(
        self, name: str, arg: Any, line: int, default: tuple[int, str, str], want: str
    ) -> Reply | None:
        """A reply from ``"text"`` or ``{code, enhanced, text}``; None (and a problem) when invalid."""
        code, enhanced, text = default
        if isinstance(arg, str):
            text = arg
        elif isinstance(arg, dict):
            unknown = set(arg) - {"code", "enhanced", "text"}
            if unknown:
                self.problem(line, f"{name}: unknown keys {sorted(unknown)}; expected code, enhanced, text")
                return None
            code = arg.get("code", code)
            enhanced = str(arg.get("enhanced", f"{str(code)[:1]}.7.1" if "code" in arg else enhanced))
            text = str(arg.get("text", text))
        elif arg not in (None, True):
            self.problem(
                line, f"{name}: expected reply text or {{code, enhanced, text}}, got {describe(arg)}"
            )
            return None
        if (
            isinstance(code, bool)
            or not isinstance(code, int)
            or str(code)[:1] != want
            or not 100 <= code <= 599
        ):
            self.problem(
                line, f"{name}: code {code!r} is invalid; expected a {want}xx reply code like {want}50"
            )
            return None
        if not text.isascii() or any(ord(c) < 32 for c in text):
            self.problem(line, f"{name}: text must be one line of printable ASCII, got {describe(text)}")
            return None
        try:
            return Reply(code, enhanced, text)
        except ValueError as err:
            self.problem(line, f"{name}: {err}")
            return None

    def _ratelimit(self, arg: Any, line: int) -> None:
        if not isinstance(arg, dict):
            self.problem(
                line,
                f"ratelimit: expected {{key: [FIELD, ...], rate: N/minute, burst: N}}, got {describe(arg)}",
            )
            return
        where = arg.line_of if isinstance(arg, LMap) else (lambda _k: line)
        unknown, missing = set(arg) - set(RATELIMIT_KEYS), {"key", "rate"} - set(arg)
        if unknown or missing:
            what = (
                f"unknown keys {sorted(unknown)}" if unknown else f"missing {' and '.join(sorted(missing))}"
            )
            self.problem(
                line, f"ratelimit: {what}; expected {', '.join(RATELIMIT_KEYS)} (key and rate required)"
            )
            return
        fields, problems = key_fields(arg["key"], self.stage)
        for message in problems:
            self.problem(where("key"), message)
        rate: Rate | None = None
        try:
            rate = parse_rate(arg["rate"])
        except ValueError as err:
            self.problem(where("rate"), f"ratelimit: rate: {err}")
        burst = arg.get("burst", rate.default_burst() if rate else 1)
        if isinstance(burst, bool) or not isinstance(burst, int) or burst < 1:
            self.problem(
                where("burst"), f"ratelimit: burst: expected a whole number >= 1, got {describe(burst)}"
            )
            return
        default = default_reply(self.stage, self.rule)
        reply = self._parse_reply("ratelimit: reply", arg.get("reply"), where("reply"), default, "4")
        if rate is not None and reply is not None and not problems:
            self.ratelimit = RateLimitAction(fields, rate, burst, reply)

    def _quarantine(self, arg: Any, line: int) -> None:
        target = arg.get("to") if isinstance(arg, dict) else arg
        if isinstance(arg, dict) and set(arg) - {"to"}:
            self.problem(line, f"quarantine: unknown keys {sorted(set(arg) - {'to'})}; expected to")
            return
        if target in (None, True):
            return
        target = str(target)
        if target.startswith("maildir:") and len(target) > len("maildir:"):
            self.quarantine_to = target
            return
        if target.startswith("smtp://"):
            try:
                parse_hostport(target[len("smtp://") :].rstrip("/"))
            except ValueError as err:
                self.problem(line, f"quarantine: {err}")
                return
            self.quarantine_to = target
            return
        self.problem(line, f"quarantine: destination {target!r}; expected maildir:PATH or smtp://host:port")

    def result(self) -> RuleActions:
        action = TERMINAL[self.terminal] if self.terminal else Action.CONTINUE
        edits = list(self.edits)
        if action is Action.QUARANTINE:
            edits.append(HeaderEdit(HeaderEditKind.ADD, QUARANTINE_HEADER, self.rule))
        return RuleActions(
            action,
            self.reply,
            self.quarantine_to,
            tuple(edits),
            self.score,
            self.stop,
            tuple(self.words),
            self.ratelimit,
        )


def compile_actions(
    file: str, rule: str, stage: Stage, node: Any, line: int, problems: list[Problem]
) -> RuleActions:
    """Compile a rule's ``then:``; problems are appended to ``problems``."""
    builder = _Builder(file, rule, stage, problems)
    items = node if isinstance(node, list) else [node]
    lines = node.item_lines if isinstance(node, LList) else [line] * len(items)
    if not items:
        builder.problem(line, "then: expected at least one action")
    for item, item_line in zip(items, lines, strict=True):
        if isinstance(item, str):
            builder.add(item, None, item_line)
        elif isinstance(item, dict) and len(item) == 1:
            ((name, arg),) = item.items()
            builder.add(str(name), arg, item.line_of(name) if isinstance(item, LMap) else item_line)
        else:
            builder.problem(
                item_line, f"expected an action like reject or {{score: 2}}, got {describe(item)}"
            )
    return builder.result()
