"""The condition compiler: YAML conditions become closures once, at load time.

Syntax (one key per mapping; several keys in one mapping mean "all of them")::

    {all: [C, ...]}  {any: [C, ...]}  {not: C}
    {FIELD: VALUE}                      # equals (a list: equals any of them)
    {FIELD: {OPERATOR: ARG, case_sensitive: true, subdomains: true}}
    {dnsbl: ZONE}  {dnsbl: {zone: ZONE, returns: [127.0.0.2, 127.0.0.4/30]}}

A compiled condition returns None (no match) or the evidence: the
``(field, value)`` pairs that made it true, which ``smtpproxy check`` prints.
Regexes of all rules are grouped per field and run as one RE2 set per value,
so two hundred regex rules cost one pass over the body (see operators.py).
"""

from __future__ import annotations

import difflib
import ipaddress
from typing import Any

from smtpproxy.rules.fields import FIELDS, STAGE_ORDER, EvalContext, Kind, lookup
from smtpproxy.rules.loader import LList, LMap, describe, line_of
from smtpproxy.rules.operators import (
    OPERATORS,
    OPTIONS,
    CompileEnv,
    Condition,
    Evidence,
    RegexGroups,
    all_of,
    any_of,
    as_list,
    bool_op,
    compile_operator,
)
from smtpproxy.rules.sessionstate import SessionRules

__all__ = ["CompileEnv", "Condition", "Evidence", "RegexGroups", "always", "compile_condition"]


def always(ctx: EvalContext) -> Evidence | None:
    """The condition of a rule without ``if``."""
    return ()


def _field_condition(env: CompileEnv, name: str, arg: Any, line: int) -> Condition | None:
    spec = lookup(name)
    if spec is None:
        names = [*FIELDS, "header.NAME", "dnsbl", "all", "any", "not"]
        hint = difflib.get_close_matches(name, names, n=1)
        if hint:
            env.problem(
                line, f"unknown field {name!r} (did you mean {hint[0]!r}?); fields: see rules/README.md"
            )
        else:
            env.problem(line, f"unknown field {name!r}; expected one of {', '.join(names)}")
        return None
    if STAGE_ORDER[spec.stage] > STAGE_ORDER[env.stage]:
        env.problem(
            line,
            f"field {name!r} is not known yet at stage {env.stage.value}; "
            f"expected stage: {spec.stage.value} or later for this rule",
        )
        return None
    env.fields_used.add(spec.name)
    if not isinstance(arg, dict):
        if spec.kind is Kind.BOOL:
            return bool_op(env, spec, arg, line)
        op = {Kind.NUMBER: "eq", Kind.IP: "cidr"}.get(spec.kind, "equals")
        return compile_operator(env, spec, op, arg, {}, line)
    opts = {k: v for k, v in arg.items() if k in OPTIONS}
    for key, value in opts.items():
        if not isinstance(value, bool):
            key_line = arg.line_of(key) if isinstance(arg, LMap) else line
            env.problem(key_line, f"{key}: expected true or false, got {describe(value)}")
    ops = [k for k in arg if k not in OPTIONS]
    if not ops:
        env.problem(line, f"{name}: expected an operator ({', '.join(OPERATORS[spec.kind])}), got none")
        return None
    conds = [
        compile_operator(env, spec, op, arg[op], opts, arg.line_of(op) if isinstance(arg, LMap) else line)
        for op in ops
    ]
    if any(c is None for c in conds):
        return None
    return all_of([c for c in conds if c is not None])


def _dnsbl(env: CompileEnv, arg: Any, line: int) -> Condition | None:
    zones: list[str] = []
    returns: list[Any] = []
    if isinstance(arg, dict):
        unknown = set(arg) - {"zone", "returns"}
        if unknown or "zone" not in arg:
            env.problem(line, f"dnsbl: expected {{zone: NAME, returns: [ADDRESSES]}}, got {describe(arg)}")
            return None
        zones = [str(z) for z in as_list(arg["zone"])]
        for item in as_list(arg.get("returns", [])):
            try:
                returns.append(ipaddress.ip_network(str(item), strict=False))
            except ValueError:
                env.problem(
                    line,
                    f"dnsbl returns: {item!r} is not an address; expected e.g. 127.0.0.2 or 127.0.0.0/24",
                )
                return None
    else:
        zones = [str(z) for z in as_list(arg)]
    for zone in zones:
        if "." not in zone or any(c.isspace() or c in "/@" for c in zone):
            env.problem(line, f"dnsbl: {zone!r} is not a DNS zone; expected a name like zen.spamhaus.org")
            return None
    clean = [z.strip(".").lower() for z in zones]
    env.dnsbl_zones.update(clean)

    def cond(ctx: EvalContext) -> Evidence | None:
        found = ctx.session.state.peek(SessionRules)
        cache = found.dnsbl if found is not None else {}
        for zone in clean:
            for record in cache.get(zone, ()):
                try:
                    addr = ipaddress.ip_address(record)
                except ValueError:
                    continue
                if not returns or any(addr.version == n.version and addr in n for n in returns):
                    return (("dnsbl", f"{ctx.session.client_ip} listed on {zone} ({record})"),)
        return None

    return cond


def _negate(inner: Condition, label: str) -> Condition:
    def cond(ctx: EvalContext) -> Evidence | None:
        return None if inner(ctx) is not None else ((f"not {label}", "no match"),)

    return cond


def compile_condition(env: CompileEnv, node: Any, line: int) -> Condition | None:
    """Compile one condition node; problems go to ``env`` and give None."""
    if not isinstance(node, dict) or not node:
        env.problem(
            line, f"expected a condition mapping like {{field: {{operator: value}}}}, got {describe(node)}"
        )
        return None
    parts: list[Condition | None] = []
    for key, arg in node.items():
        key_line = node.line_of(key) if isinstance(node, LMap) else line
        if key in ("all", "any"):
            if not isinstance(arg, list) or not arg:
                env.problem(key_line, f"{key}: expected a non-empty list of conditions, got {describe(arg)}")
                parts.append(None)
                continue
            lines = arg.item_lines if isinstance(arg, LList) else [key_line] * len(arg)
            subs = [compile_condition(env, item, ln) for item, ln in zip(arg, lines, strict=True)]
            ok = [s for s in subs if s is not None]
            parts.append(None if len(ok) != len(subs) else (all_of(ok) if key == "all" else any_of(ok)))
        elif key == "not":
            inner = compile_condition(env, arg, line_of(arg, key_line))
            label = ",".join(sorted(arg)) if isinstance(arg, dict) else "condition"
            parts.append(None if inner is None else _negate(inner, label))
        elif key == "dnsbl":
            parts.append(_dnsbl(env, arg, key_line))
        else:
            parts.append(_field_condition(env, str(key), arg, key_line))
    if any(p is None for p in parts):
        return None
    return all_of([p for p in parts if p is not None])
