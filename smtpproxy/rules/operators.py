"""Operators of rule conditions (equals, contains, regex, in_list, cidr, gt, exists, ...).

Each operator compiles, once, into a closure over one field that returns the
evidence ``((field, value),)`` of its first matching value, or None. Regexes
of all rules are grouped per field and run as one RE2 set per value, so two
hundred regex rules cost one pass over the body.
"""

from __future__ import annotations

import difflib
import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import re2

from smtpproxy.rules.fields import EvalContext, FieldSpec, Kind
from smtpproxy.rules.lists import RuleList, build_list
from smtpproxy.rules.loader import LList, Problem, describe
from smtpproxy.stages import Stage

Evidence = tuple[tuple[str, str], ...]
Condition = Callable[[EvalContext], Evidence | None]

EVIDENCE_CHARS = 200

TEXT_OPS = ("equals", "contains", "starts_with", "ends_with", "regex", "in_list", "exists")
OPERATORS: dict[Kind, tuple[str, ...]] = {
    Kind.TEXT: TEXT_OPS,
    Kind.IP: ("equals", "cidr", "in_list", "exists"),
    Kind.NUMBER: ("gt", "ge", "lt", "le", "eq", "equals", "exists"),
    Kind.BOOL: ("equals", "exists"),
}
OPTIONS = ("case_sensitive", "subdomains")


def _regex_options(case_sensitive: bool) -> Any:
    options = re2.Options()
    # RE2 would also print each bad pattern to stderr through absl ("WARNING: All log
    # messages before absl::InitializeLog()", "E0000 ... re2.cc"): our error names it.
    options.log_errors = False
    options.case_sensitive = case_sensitive
    options.max_mem = 64 << 20
    return options


class RegexGroups:
    """Every regex of a rule set, grouped per (field, case sensitivity) into RE2 sets."""

    def __init__(self) -> None:
        self._patterns: dict[tuple[str, bool], list[Any]] = {}
        self._sets: dict[tuple[str, bool], Any] = {}

    def add(self, field_name: str, case_sensitive: bool, compiled: Any) -> tuple[tuple[str, bool], int]:
        """Register a compiled pattern; returns its group key and index."""
        group = self._patterns.setdefault((field_name, case_sensitive), [])
        group.append(compiled)
        return (field_name, case_sensitive), len(group) - 1

    def build(self) -> None:
        """Compile the sets; a group RE2 cannot build as one set falls back to one scan per regex."""
        for key, patterns in self._patterns.items():
            regex_set = re2.Set.SearchSet(_regex_options(key[1]))
            try:
                for compiled in patterns:
                    regex_set.Add(compiled.pattern)
                regex_set.Compile()
            except re2.error:
                continue
            self._sets[key] = regex_set

    def scan(self, ctx: EvalContext, key: tuple[str, bool], spec: FieldSpec) -> dict[int, str]:
        """Pattern index -> first value it matched, for every pattern of the group (one pass)."""
        hits = ctx.regex_hits.get(key)
        if hits is not None:
            return hits
        hits = {}
        regex_set = self._sets.get(key)
        for value in ctx.values(spec):
            text = str(value)
            if regex_set is not None:
                try:
                    for index in regex_set.Match(text) or ():
                        hits.setdefault(index, text)
                    continue
                except re2.error:
                    pass
            for index, compiled in enumerate(self._patterns[key]):
                if index not in hits and compiled.search(text):
                    hits[index] = text
        ctx.regex_hits[key] = hits
        return hits


@dataclass(slots=True)
class CompileEnv:
    """What the compiler of one rule needs and collects."""

    file: str
    rule: str
    stage: Stage
    lists: dict[str, RuleList]
    regexes: RegexGroups
    problems: list[Problem] = field(default_factory=list)
    dnsbl_zones: set[str] = field(default_factory=set)
    fields_used: set[str] = field(default_factory=set)

    def problem(self, line: int, message: str) -> None:
        """Record a problem of this rule."""
        self.problems.append(Problem(self.file, line, self.rule, message))


def _clip(value: Any) -> str:
    text = str(value)
    return text if len(text) <= EVIDENCE_CHARS else text[: EVIDENCE_CHARS - 3] + "..."


def as_list(arg: Any) -> list[Any]:
    return list(arg) if isinstance(arg, list) else [arg]


def _text_args(env: CompileEnv, line: int, op: str, arg: Any) -> list[str] | None:
    items = as_list(arg)
    if not items or not all(isinstance(i, str | int | float) and not isinstance(i, bool) for i in items):
        env.problem(line, f"{op}: expected a string or a list of strings, got {describe(arg)}")
        return None
    return [str(i) for i in items]


def _match_any(spec: FieldSpec, fold: bool, test: Callable[[str], bool]) -> Condition:
    name = spec.name

    def cond(ctx: EvalContext) -> Evidence | None:
        values = ctx.lowered(spec) if fold else ctx.values(spec)
        for i, value in enumerate(values):
            if test(str(value)):
                return ((name, _clip(ctx.values(spec)[i])),)
        return None

    return cond


def _text_op(
    env: CompileEnv, spec: FieldSpec, op: str, arg: Any, opts: dict[str, Any], line: int
) -> Condition | None:
    case_sensitive = bool(opts.get("case_sensitive", False))
    fold = not case_sensitive
    if op == "regex":
        patterns = _text_args(env, line, op, arg)
        if patterns is None:
            return None
        leaves: list[Condition] = []
        for pattern in patterns:
            try:
                compiled = re2.compile(pattern, _regex_options(case_sensitive))
            except re2.error as err:
                env.problem(
                    line, f"regex {pattern!r} is invalid: {err}; expected RE2 syntax (no backreferences)"
                )
                continue
            leaves.append(_regex_leaf(env, spec, case_sensitive, compiled))
        return any_of(leaves) if len(leaves) == len(patterns) else None
    if op == "in_list":
        rule_list = _resolve_list(env, arg, line)
        if rule_list is None:
            return None
        subdomains = opts.get("subdomains")
        return _match_list(spec, rule_list, None if subdomains is None else bool(subdomains))
    args = _text_args(env, line, op, arg)
    if args is None:
        return None
    needles = tuple(a.lower() for a in args) if fold else tuple(args)
    tests: dict[str, Callable[[str], bool]] = {
        "equals": lambda v: v in needles,
        "contains": lambda v: any(n in v for n in needles),
        "starts_with": lambda v: v.startswith(needles),
        "ends_with": lambda v: v.endswith(needles),
    }
    return _match_any(spec, fold, tests[op])


def _regex_leaf(env: CompileEnv, spec: FieldSpec, case_sensitive: bool, compiled: Any) -> Condition:
    groups = env.regexes
    key, index = groups.add(spec.name, case_sensitive, compiled)
    name = spec.name

    def cond(ctx: EvalContext) -> Evidence | None:
        # The group's hits are usually known already (one scan serves every rule of the field).
        hits = ctx.regex_hits.get(key)
        value = (hits if hits is not None else groups.scan(ctx, key, spec)).get(index)
        if value is None:
            return None
        found = compiled.search(value)
        return ((name, _clip(found.group(0) if found else value)),)

    return cond


def _resolve_list(env: CompileEnv, arg: Any, line: int) -> RuleList | None:
    if isinstance(arg, str):
        found = env.lists.get(arg)
        if found is None:
            known = ", ".join(sorted(env.lists)) or "none are defined"
            env.problem(
                line, f"in_list: unknown list {arg!r}; expected a list name ({known}) or an inline list"
            )
        return found
    if isinstance(arg, list) and all(
        isinstance(i, str | int | float) and not isinstance(i, bool) for i in arg
    ):
        lines = arg.item_lines if isinstance(arg, LList) else [line] * len(arg)
        built, problems = build_list(
            "(inline)", zip(lines, map(str, arg), strict=True), file=env.file, rule=env.rule
        )
        env.problems.extend(problems)
        return None if problems else built
    env.problem(line, f"in_list: expected a list name or a list of entries, got {describe(arg)}")
    return None


def _match_list(spec: FieldSpec, rule_list: RuleList, subdomains: bool | None) -> Condition:
    name = spec.name
    is_ip = spec.kind is Kind.IP

    def cond(ctx: EvalContext) -> Evidence | None:
        for value in ctx.values(spec):
            hit = (
                rule_list.match_ip(value)
                if is_ip
                else rule_list.match_text(str(value), subdomains=subdomains)
            )
            if hit is not None:
                return ((name, f"{_clip(value)} (list {rule_list.name}: {hit})"),)
        return None

    return cond


def _ip_op(env: CompileEnv, spec: FieldSpec, op: str, arg: Any, line: int) -> Condition | None:
    if op == "in_list":
        rule_list = _resolve_list(env, arg, line)
        return None if rule_list is None else _match_list(spec, rule_list, None)
    nets = []
    for item in as_list(arg):
        try:
            nets.append(ipaddress.ip_network(str(item), strict=False))
        except ValueError:
            env.problem(
                line,
                f"{op}: {item!r} is not an IP address or network; expected e.g. 192.0.2.0/24 or 2001:db8::/32",
            )
    if not nets:
        return None
    name = spec.name

    def cond(ctx: EvalContext) -> Evidence | None:
        for ip in ctx.values(spec):
            for net in nets:
                if ip.version == net.version and ip in net:
                    return ((name, f"{ip} (in {net})"),)
        return None

    return cond


def _number_op(env: CompileEnv, spec: FieldSpec, op: str, arg: Any, line: int) -> Condition | None:
    if isinstance(arg, bool) or not isinstance(arg, int | float):
        env.problem(line, f"{op}: expected a number, got {describe(arg)}")
        return None
    limit = float(arg)
    compare: dict[str, Callable[[float], bool]] = {
        "gt": lambda v: v > limit,
        "ge": lambda v: v >= limit,
        "lt": lambda v: v < limit,
        "le": lambda v: v <= limit,
        "eq": lambda v: v == limit,
        "equals": lambda v: v == limit,
    }
    test = compare[op]
    name = spec.name

    def cond(ctx: EvalContext) -> Evidence | None:
        for value in ctx.values(spec):
            if test(float(value)):
                return ((name, f"{value:g}"),)
        return None

    return cond


def bool_op(env: CompileEnv, spec: FieldSpec, arg: Any, line: int) -> Condition | None:
    if not isinstance(arg, bool):
        env.problem(line, f"{spec.name}: expected true or false, got {describe(arg)}")
        return None
    name = spec.name

    def cond(ctx: EvalContext) -> Evidence | None:
        return ((name, str(arg).lower()),) if arg in ctx.values(spec) else None

    return cond


def _exists(env: CompileEnv, spec: FieldSpec, arg: Any, line: int) -> Condition | None:
    if not isinstance(arg, bool):
        env.problem(line, f"exists: expected true or false, got {describe(arg)}")
        return None
    name = spec.name

    def cond(ctx: EvalContext) -> Evidence | None:
        present = any(v not in ("", None) for v in ctx.values(spec))
        if present != arg:
            return None
        return ((name, "present" if present else "absent"),)

    return cond


def compile_operator(
    env: CompileEnv, spec: FieldSpec, op: str, arg: Any, opts: dict[str, Any], line: int
) -> Condition | None:
    allowed = OPERATORS[spec.kind]
    if op not in allowed:
        hint = difflib.get_close_matches(op, allowed, n=1)
        also = f" (did you mean {hint[0]!r}?)" if hint else ""
        env.problem(
            line,
            f"{spec.name}: unknown operator {op!r} for a {spec.kind.value} field{also}; "
            f"expected one of {', '.join(allowed)}",
        )
        return None
    if op == "exists":
        return _exists(env, spec, arg, line)
    if spec.kind is Kind.TEXT:
        return _text_op(env, spec, op, arg, opts, line)
    if spec.kind is Kind.IP:
        return _ip_op(env, spec, op, arg, line)
    if spec.kind is Kind.NUMBER:
        return _number_op(env, spec, op, arg, line)
    return bool_op(env, spec, arg, line)


def all_of(conds: Sequence[Condition]) -> Condition:
    if len(conds) == 1:
        return conds[0]

    def cond(ctx: EvalContext) -> Evidence | None:
        evidence: list[tuple[str, str]] = []
        for c in conds:
            found = c(ctx)
            if found is None:
                return None
            evidence.extend(found)
        return tuple(evidence)

    return cond


def any_of(conds: Sequence[Condition]) -> Condition:
    if len(conds) == 1:
        return conds[0]

    def cond(ctx: EvalContext) -> Evidence | None:
        for c in conds:
            found = c(ctx)
            if found is not None:
                return found
        return None

    return cond
