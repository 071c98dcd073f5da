"""Loading a rules folder into an immutable, compiled RuleSet.

The folder holds ``*.yaml``/``*.yml`` rule files (loaded in name order) and
optionally ``lists/*.txt`` (each file is a list named after it). A rule file is
either a list of rules, or a mapping with ``rules:``, ``lists:`` and ``tests:``.
Every problem of every file is collected and raised together as RulesError.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from smtpproxy.rules.actions import RuleActions, compile_actions
from smtpproxy.rules.conditions import CompileEnv, Condition, RegexGroups, always, compile_condition
from smtpproxy.rules.lists import RuleList, build_list, read_list_file
from smtpproxy.rules.loader import LList, LMap, Problem, RulesError, describe, line_of, read_yaml
from smtpproxy.stages import Stage

RULE_KEYS = ("name", "description", "stage", "if", "then", "enabled")
FILE_KEYS = ("rules", "lists", "tests")
RULE_STAGES = (Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT, Stage.DATA)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
MAX_FILES = 1000


@dataclass(frozen=True, slots=True)
class Rule:
    """One compiled rule."""

    name: str
    description: str
    stage: Stage
    file: str
    line: int
    condition: Condition
    actions: RuleActions


@dataclass(frozen=True, slots=True)
class TestBlock:
    """The raw ``tests:`` of one rule file, compiled by :mod:`smtpproxy.rules.testing`."""

    file: str
    path: Path
    node: Any


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Compiled rules of one load: never changed, replaced whole on reload."""

    rules: tuple[Rule, ...]
    by_stage: dict[Stage, tuple[Rule, ...]]
    dnsbl_zones: dict[Stage, tuple[str, ...]]
    lists: dict[str, RuleList]
    regexes: RegexGroups
    files: tuple[str, ...]
    tests: tuple[TestBlock, ...]
    loaded_at: float

    def __len__(self) -> int:
        return len(self.rules)


def empty_ruleset() -> RuleSet:
    """No rules at all (an empty or missing folder)."""
    return RuleSet(
        (), {s: () for s in RULE_STAGES}, {s: () for s in RULE_STAGES}, {}, RegexGroups(), (), (), time.time()
    )


def _declared_lists(
    display: str,
    base: Path,
    node: Any,
    lists: dict[str, RuleList],
    origin: dict[str, str],
    problems: list[Problem],
) -> None:
    if not isinstance(node, dict):
        problems.append(
            Problem(
                display, line_of(node), "", f"lists: expected a mapping of NAME: FILE, got {describe(node)}"
            )
        )
        return
    for name, spec in node.items():
        line = node.line_of(name) if isinstance(node, LMap) else 0
        subdomains = False
        if isinstance(spec, dict):
            if set(spec) - {"file", "entries", "subdomains"} or ("file" in spec) == ("entries" in spec):
                problems.append(
                    Problem(
                        display,
                        line,
                        "",
                        f"list {name}: expected {{file: NAME.txt}} or "
                        f"{{entries: [...]}} and optionally subdomains: true, got {describe(spec)}",
                    )
                )
                continue
            subdomains = spec.get("subdomains") is True
            spec = spec.get("file", spec.get("entries"))
        if name in lists:
            problems.append(Problem(display, line, "", f"list {name}: already defined in {origin[name]}"))
            continue
        if isinstance(spec, str):
            path = base / spec
            found, more = read_list_file(path, f"{display} -> {spec}", name, subdomains=subdomains)
        elif isinstance(spec, list):
            lines = spec.item_lines if isinstance(spec, LList) else [line] * len(spec)
            found, more = build_list(
                name, zip(lines, map(str, spec), strict=True), file=display, subdomains=subdomains
            )
        else:
            problems.append(
                Problem(
                    display, line, "", f"list {name}: expected a file name or a list, got {describe(spec)}"
                )
            )
            continue
        problems.extend(more)
        lists[name], origin[name] = found, display


def _compile_rule(
    display: str,
    node: Any,
    line: int,
    lists: dict[str, RuleList],
    regexes: RegexGroups,
    seen: dict[str, str],
    problems: list[Problem],
) -> tuple[Rule | None, set[str]]:
    if not isinstance(node, dict):
        problems.append(
            Problem(
                display, line, "", f"expected a rule (a mapping with name, if, then), got {describe(node)}"
            )
        )
        return None, set()
    name = node.get("name")
    before = len(problems)
    if not isinstance(name, str) or not _NAME.match(name):
        problems.append(
            Problem(
                display,
                line,
                str(name or ""),
                "name: expected letters, digits, '_', '-' or '.' "
                f"(at most 64, starting with a letter or digit), got {describe(name)}",
            )
        )
        name = str(name or "?")  # keep compiling: report every problem of the rule at once
    where = node.line_of if isinstance(node, LMap) else (lambda _k: line)
    if name in seen:
        problems.append(
            Problem(display, where("name"), name, f"duplicate rule name, first defined in {seen[name]}")
        )
    seen.setdefault(name, f"{display}:{line}")
    for key in node:
        if key not in RULE_KEYS:
            problems.append(
                Problem(
                    display, where(key), name, f"unknown key {key!r}; expected one of {', '.join(RULE_KEYS)}"
                )
            )
    stage_word = node.get("stage", "data")
    stage = next((s for s in RULE_STAGES if s.value == stage_word), None)
    if stage is None:
        problems.append(
            Problem(
                display,
                where("stage"),
                name,
                f"stage: expected one of "
                f"{', '.join(s.value for s in RULE_STAGES)}, got {describe(stage_word)}",
            )
        )
        return None, set()
    if "then" not in node:
        problems.append(Problem(display, line, name, "missing 'then': expected the actions of the rule"))
    if not isinstance(node.get("enabled", True), bool) or not isinstance(node.get("description", ""), str):
        problems.append(
            Problem(display, line, name, "enabled: expected true/false and description: a string")
        )
    env = CompileEnv(display, name, stage, lists, regexes)
    condition: Condition | None = always
    if "if" in node:
        condition = compile_condition(env, node["if"], line_of(node["if"], where("if")))
    problems.extend(env.problems)
    actions = compile_actions(
        display, name, stage, node.get("then"), line_of(node.get("then"), where("then")), problems
    )
    if len(problems) > before or condition is None or node.get("enabled", True) is False:
        return None, set()
    rule = Rule(name, str(node.get("description", "")), stage, display, line, condition, actions)
    return rule, env.dnsbl_zones


def load_ruleset(folder: Path) -> RuleSet:
    """Load and compile every rule file of ``folder``; raise RulesError listing every problem."""
    if not folder.exists():
        return empty_ruleset()
    if not folder.is_dir():
        raise RulesError([Problem(str(folder), 0, "", "expected a folder of rule files, found a file")])
    problems: list[Problem] = []
    lists: dict[str, RuleList] = {}
    origin: dict[str, str] = {}
    list_dir = folder / "lists"
    if list_dir.is_dir():
        for path in sorted(list_dir.glob("*.txt"))[:MAX_FILES]:
            display = f"lists/{path.name}"
            lists[path.stem], more = read_list_file(path, display, path.stem)
            origin[path.stem] = display
            problems.extend(more)
    paths = sorted(p for p in folder.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())[:MAX_FILES]
    documents: list[tuple[str, Any, int]] = []
    tests: list[TestBlock] = []
    for path in paths:
        data, more = read_yaml(path, path.name)
        problems.extend(more)
        if data is None:
            continue
        rules_node: Any = data
        if isinstance(data, LMap):
            for key in data:
                if key not in FILE_KEYS:
                    problems.append(
                        Problem(
                            path.name,
                            data.line_of(key),
                            "",
                            f"unknown key {key!r}; expected "
                            "rules, lists, tests (or make the file a list of rules)",
                        )
                    )
            if "lists" in data:
                _declared_lists(path.name, path.parent, data["lists"], lists, origin, problems)
            if "tests" in data:
                tests.append(TestBlock(path.name, path, data["tests"]))
            rules_node = data.get("rules", [])
        if not isinstance(rules_node, list):
            problems.append(
                Problem(
                    path.name,
                    line_of(rules_node, 1),
                    "",
                    f"rules: expected a list of rules, got {describe(rules_node)}",
                )
            )
            continue
        lines = rules_node.item_lines if isinstance(rules_node, LList) else [1] * len(rules_node)
        documents.extend((path.name, item, ln) for item, ln in zip(rules_node, lines, strict=True))
    regexes = RegexGroups()
    seen: dict[str, str] = {}
    compiled: list[Rule] = []
    zones: dict[Stage, set[str]] = {s: set() for s in RULE_STAGES}
    for display, node, line in documents:
        rule, rule_zones = _compile_rule(display, node, line, lists, regexes, seen, problems)
        if rule is not None:
            compiled.append(rule)
            zones[rule.stage].update(rule_zones)
    if problems:
        raise RulesError(problems)
    regexes.build()
    by_stage = {s: tuple(r for r in compiled if r.stage is s) for s in RULE_STAGES}
    return RuleSet(
        tuple(compiled),
        by_stage,
        {s: tuple(sorted(z)) for s, z in zones.items()},
        lists,
        regexes,
        tuple(p.name for p in paths),
        tuple(tests),
        time.time(),
    )
