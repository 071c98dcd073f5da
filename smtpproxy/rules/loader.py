"""YAML reading that keeps line numbers, and the error type every rule problem becomes.

PyYAML's ``safe_load`` forgets where a value came from; an operator reading
``rule block_x: unknown operator 'regexp'`` wants the line too. We compose
the document to nodes and build plain dicts/lists that remember the line of
every key and item (``LMap.line_of(key)``, ``LList.line_of(index)``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import SafeConstructor


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong in a rule file: where, which rule, what, and what was expected."""

    file: str
    line: int
    rule: str
    message: str
    kind: str = "rule"  # "test" for problems of inline tests

    def render(self) -> str:
        """``FILE:LINE: rule NAME: problem`` (the rule part left out when unknown)."""
        where = f"{self.file}:{self.line}" if self.line else self.file
        who = f" {self.kind} {self.rule}:" if self.rule else ""
        return f"{where}:{who} {self.message}"


class RulesError(Exception):
    """The rules folder cannot be loaded; ``problems`` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(p.render() for p in problems))

    def render(self) -> str:
        """One problem per line, for the operator."""
        return "\n".join(p.render() for p in self.problems)


class LMap(dict[str, Any]):
    """A YAML mapping that remembers its own line and the line of each key (1-based)."""

    line: int
    key_lines: dict[str, int]

    def line_of(self, key: str) -> int:
        """The line of ``key``, or of the mapping itself when the key is absent."""
        return self.key_lines.get(key, self.line)


class LList(list[Any]):
    """A YAML sequence that remembers its own line and the line of each item (1-based)."""

    line: int
    item_lines: list[int]

    def line_of(self, index: int) -> int:
        """The line of item ``index``."""
        return self.item_lines[index] if 0 <= index < len(self.item_lines) else self.line


def line_of(value: Any, default: int = 0) -> int:
    """The line where a composed value starts, when it is a mapping or a list."""
    return int(getattr(value, "line", default))


class _Builder:
    """Turns composed nodes into LMap / LList / plain scalars, noting duplicate keys."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.constructor = SafeConstructor()
        self.problems: list[Problem] = []

    def build(self, node: yaml.Node) -> Any:
        if isinstance(node, yaml.MappingNode):
            out = LMap()
            out.line = node.start_mark.line + 1
            out.key_lines = {}
            for key_node, value_node in node.value:
                key = self.build(key_node)
                line = key_node.start_mark.line + 1
                if not isinstance(key, str):
                    key = str(key)
                if key in out:
                    self.problems.append(
                        Problem(
                            self.file, line, "", f"duplicate key {key!r} (first on line {out.key_lines[key]})"
                        )
                    )
                    continue
                out[key] = self.build(value_node)
                out.key_lines[key] = line
            return out
        if isinstance(node, yaml.SequenceNode):
            seq = LList(self.build(item) for item in node.value)
            seq.line = node.start_mark.line + 1
            seq.item_lines = [item.start_mark.line + 1 for item in node.value]
            return seq
        return self.constructor.construct_object(node, deep=True)


def read_yaml(path: Path, display: str) -> tuple[Any, list[Problem]]:
    """Read one YAML file into LMap/LList values; problems instead of exceptions.

    ``display`` is the file name used in problems (relative to the rules folder).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        return None, [Problem(display, 0, "", f"not UTF-8 text ({err.reason} at byte {err.start})")]
    except OSError as err:
        return None, [Problem(display, 0, "", f"cannot read: {err.strerror}")]
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        line = mark.line + 1 if mark else 0
        return None, [Problem(display, line, "", f"invalid YAML: {err.problem or err}")]
    except yaml.YAMLError as err:
        return None, [Problem(display, 0, "", f"invalid YAML: {err}")]
    if node is None:
        return None, []
    builder = _Builder(display)
    try:
        value = builder.build(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = mark.line + 1 if mark else 0
        return None, [Problem(display, line, "", f"invalid YAML value: {getattr(err, 'problem', err)}")]
    return value, builder.problems


def describe(value: Any) -> str:
    """A short rendering of a value for error messages."""
    text = repr(
        dict(value) if isinstance(value, LMap) else list(value) if isinstance(value, LList) else value
    )
    return text if len(text) <= 60 else text[:57] + "..."
