"""The policy's header edits as milter operations: the same result as apply_edits, field for field."""

from __future__ import annotations

from smtpproxy.auth.authresults import forged_filter
from smtpproxy.milter.edits import Append, Change, Insert, operations
from smtpproxy.verdict import HeaderEdit, HeaderEditKind

ADD, REMOVE, TAG = HeaderEditKind.ADD, HeaderEditKind.REMOVE, HeaderEditKind.SUBJECT_TAG
FIELDS = [
    (b"Received", b" from a\n\tby b"),
    (b"X-Spam", b" yes"),
    (b"Subject", b" hello"),
    (b"x-spam", b" again"),
    (b"Authentication-Results", b" mx.test.example; spf=pass"),
]


def test_adds_go_to_the_top_in_order_removals_last_first() -> None:
    edits = [
        HeaderEdit(ADD, "Authentication-Results", "mx.test.example; spf=none"),
        HeaderEdit(ADD, "X-Rule", "hit"),
        HeaderEdit(REMOVE, "X-Spam"),
    ]
    ops = operations(FIELDS, edits, forged_filter("mx.test.example"))
    assert ops == [
        Change(1, "Authentication-Results", ""),
        Change(2, "x-spam", ""),
        Change(1, "X-Spam", ""),
        Insert(0, "Authentication-Results", " mx.test.example; spf=none"),
        Insert(1, "X-Rule", " hit"),
    ]


def test_subject_tag_changes_the_subject_once() -> None:
    ops = operations(FIELDS, [HeaderEdit(TAG, "Subject", "[SPAM]")])
    assert ops == [Change(1, "Subject", " [SPAM] hello")]
    tagged = [(b"Subject", b" [SPAM] hello")]
    assert operations(tagged, [HeaderEdit(TAG, "Subject", "[SPAM]")]) == []  # already tagged


def test_subject_tag_without_a_subject_adds_one() -> None:
    assert operations([(b"From", b" a@b")], [HeaderEdit(TAG, "Subject", "[SPAM]")]) == [
        Append("Subject", " [SPAM]")
    ]


def test_without_leading_space_values_have_none() -> None:
    ops = operations([(b"Subject", b"hello")], [HeaderEdit(TAG, "Subject", "[X]")], leading_space=False)
    assert ops == [Change(1, "Subject", "[X] hello")]


def test_long_added_value_is_folded_with_lf() -> None:
    [op] = operations([], [HeaderEdit(ADD, "Authentication-Results", "mx; " + "spf=pass " * 20)])
    assert isinstance(op, Insert) and "\n\t" in op.value and "\r" not in op.value
