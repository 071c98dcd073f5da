"""The policy's header edits as milter operations on the MTA's copy of the message.

In proxy mode the policy's edits are applied to the bytes we send
(:func:`smtpproxy.headers.apply_edits`); in milter mode the MTA keeps the
message and we tell it what to change, one operation per field. The same
semantics, field for field: added fields go to the top in the order given;
removals (by name, and the forged Authentication-Results the ``drop``
predicate finds) apply to the incoming fields only; subject tags are worded by
``apply_edits`` itself, so a tag is never added twice.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

from smtpproxy.headers import apply_edits, format_field
from smtpproxy.verdict import HeaderEdit, HeaderEditKind


@dataclass(frozen=True, slots=True)
class Insert:
    """Insert a field at ``index`` (0: the top)."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class Change:
    """Change the ``index``-th (from 1) field named ``name``; ``value`` "" deletes it."""

    index: int
    name: str
    value: str


@dataclass(frozen=True, slots=True)
class Append:
    """Add a field at the end of the header."""

    name: str
    value: str


Operation = Insert | Change | Append


def raw_field(name: bytes, value: bytes, *, leading_space: bool) -> bytes:
    """A field as it was on the wire, from the MTA's name and value (LF-folded)."""
    value = value.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    return name + (b":" if leading_space else b": ") + value + b"\r\n"


def milter_value(field: bytes, *, leading_space: bool) -> str:
    """The value part of a formatted field, as a milter sends it (LF folds, no final line end)."""
    _, _, value = field.partition(b":")
    text = value.decode("utf-8", "surrogateescape").replace("\r\n", "\n").rstrip("\n")
    return text if leading_space else text.removeprefix(" ")


def operations(
    fields: list[tuple[bytes, bytes]],
    edits: Iterable[HeaderEdit],
    drop: Callable[[bytes], bool] | None = None,
    *,
    leading_space: bool = True,
) -> list[Operation]:
    """The operations that make the MTA's header what ``apply_edits`` would have made of it.

    ``fields``: the header as the MTA sent it (name, value). Deletions come
    last-first, so no deletion moves the index of another.
    """
    edits = list(edits)
    removals = {e.name.lower() for e in edits if e.kind is HeaderEditKind.REMOVE}
    tags = [e for e in edits if e.kind is HeaderEditKind.SUBJECT_TAG]
    counts: dict[str, int] = {}
    deletions: list[Operation] = []
    changes: list[Operation] = []
    has_subject = False
    for name, value in fields:
        key = name.decode("ascii", "replace").strip().lower()
        counts[key] = index = counts.get(key, 0) + 1
        raw = raw_field(name, value, leading_space=leading_space)
        label = name.decode("ascii", "replace")
        if key in removals or (drop is not None and drop(raw)):
            deletions.append(Change(index, label, ""))
        elif key == "subject" and tags:
            has_subject = True
            tagged = apply_edits(raw + b"\r\n", tags)[:-2]
            if tagged != raw:
                changes.append(Change(index, label, milter_value(tagged, leading_space=leading_space)))
    ops: list[Operation] = [*reversed(deletions), *changes]
    if tags and not has_subject:
        subject = apply_edits(b"\r\n", tags)
        ops.append(
            Append(
                "Subject", milter_value(subject.split(b"\r\n\r\n")[0] + b"\r\n", leading_space=leading_space)
            )
        )
    adds = [e for e in edits if e.kind is HeaderEditKind.ADD]
    for position, edit in enumerate(adds):
        formatted = format_field(edit.name, edit.value)
        ops.append(Insert(position, edit.name, milter_value(formatted, leading_space=leading_space)))
    return ops
