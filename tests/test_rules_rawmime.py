"""The fast MIME reader against the email package: same header fields, same tree, same body facts."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage, Message
from email.parser import BytesHeaderParser
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.rules.mime import body_facts, parse_body
from smtpproxy.rules.rawmime import MAX_DEPTH, parse_message, raw_header_fields

SAMPLES = sorted(
    (Path(__file__).resolve().parent.parent / "smtpproxy" / "data" / "rules" / "samples").glob("*.eml")
)


def reference(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def reference_fields(raw: bytes) -> list[tuple[str, Any]]:
    return list(BytesHeaderParser(policy=email.policy.compat32).parsebytes(raw).raw_items())


def shape(msg: Message) -> list[tuple[Any, ...]]:
    """Everything rules can read of a tree, node by node in walk order."""
    out: list[tuple[Any, ...]] = []
    for part in msg.walk():
        payload = part.get_payload()
        out.append(
            (
                list(part.raw_items()),
                part.get_unixfrom(),
                part.get_default_type(),
                part.is_multipart(),
                len(payload) if isinstance(payload, list) else payload,
                # get_payload() decodes 8-bit text; as bytes it is the raw payload
                None if part.is_multipart() else part.get_payload(decode=True),
            )
        )
    return out


def assert_same_tree(raw: bytes) -> Message:
    fast = parse_message(raw)
    assert fast is not None, raw
    assert shape(fast) == shape(reference(raw))
    assert body_facts(fast) == body_facts(reference(raw))
    return fast


def newsletter() -> bytes:
    m = EmailMessage()
    m["From"] = "Shop <news@shop.example.com>"
    m["Subject"] = "=?utf-8?q?Caf=C3=A9?= offers"
    m.set_content("plain text with https://shop.example.com/a\n")
    m.add_alternative("<p>html <a href='https://shop.example.com/b'>b</a></p>", subtype="html")
    m.add_attachment(b"%PDF-1.4\n" + b"0" * 300, maintype="application", subtype="pdf", filename="c.pdf")
    return m.as_bytes().replace(b"\n", b"\r\n")


# -- header fields ------------------------------------------------------------------------

HEADER_CASES = [
    b"",
    b"\r\n",
    b"Subject: only a header",
    b"Subject: a\r\n",
    b"Subject: folded\r\n  over\r\n\tthree lines\r\n\r\nbody",
    b"Subject: =?utf-8?q?caf=C3=A9?= =?iso-8859-1?b?6Q==?=\r\n\r\n",
    b"Received: one\r\nReceived: two\r\nreceived: three\r\n\r\n",
    b"Subject: bare LF\nFrom: a@example.net\n\nbody\n",
    b"Subject: bare CR\rFrom: a@example.net\r\rbody",
    b"Subject: mixed\r\nX-A: b\n\r\nbody",
    b"From someone@example.net Mon Jun  3 10:00:00 2024\r\nSubject: unix from\r\n\r\n",
    b"Subject: a\r\nFrom misplaced\r\nX-B: c\r\n\r\n",
    b"Subject: a\r\nFrom at the end\r\n\r\nbody",
    b" leading continuation\r\nSubject: a\r\n\r\n",
    b":no name\r\n continued\r\nSubject: a\r\n\r\n",
    b"Subject: a\r\nnot a header line\r\nX-After: b\r\n\r\n",
    b"Subject: a\r\n \r\nX-Whitespace-Line-Is-A-Continuation: b\r\n\r\n",
    b"Subject: caf\xc3\xa9 \xff\r\n\r\n",
    b"Subject:\r\nX-Empty:   \r\n\r\n",
    b"Sub ject: space in the name ends the header\r\n\r\n",
]


@pytest.mark.parametrize("raw", HEADER_CASES)
def test_header_fields_are_those_of_the_email_package(raw: bytes) -> None:
    assert raw_header_fields(raw) == reference_fields(raw)


def test_header_fields_do_not_depend_on_the_body() -> None:
    head = b"Subject: a\r\nX-B: c\r\n\r\n"
    assert raw_header_fields(head + b"X-Not-A-Header: in the body\r\n" * 1000) == [
        ("Subject", "a"),
        ("X-B", "c"),
    ]


HEADER_LINES = st.sampled_from(
    [
        "Subject: hello",
        "From: A <a@example.net>",
        "From someone",
        " folded",
        "\tfolded",
        " ",
        ":empty name",
        "X-Dup: 1",
        "x-dup: 2",
        "Subject: =?utf-8?b?w6k=?=",
        "no colon here",
        "",
        "Content-Type: text/plain",
    ]
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.tuples(HEADER_LINES, st.sampled_from(["\r\n", "\n", "\r"])), max_size=12),
    st.binary(max_size=20),
)
def test_generated_header_blocks_match_the_email_package(lines: list[tuple[str, str]], tail: bytes) -> None:
    raw = "".join(text + eol for text, eol in lines).encode() + tail
    assert raw_header_fields(raw) == reference_fields(raw)


# -- the MIME tree ------------------------------------------------------------------------


@pytest.mark.parametrize("path", SAMPLES, ids=lambda p: p.name)
def test_shipped_samples_give_the_same_tree(path: Path) -> None:
    assert_same_tree(path.read_bytes())


def test_newsletter_gives_the_same_tree_and_facts() -> None:
    fast = assert_same_tree(newsletter())
    assert [p.get_content_type() for p in fast.walk()] == [
        "multipart/mixed",
        "multipart/alternative",
        "text/plain",
        "text/html",
        "application/pdf",
    ]


MULTIPART = b"Subject: x\r\nContent-Type: multipart/mixed; boundary=b1\r\n\r\n"

TREE_CASES = {
    "preamble and epilogue": MULTIPART
    + b"preamble\r\n--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n--b1--\r\nepilogue\r\n",
    "missing close boundary": MULTIPART + b"--b1\r\n\r\nfirst\r\n--b1\r\nX: y\r\n\r\nsecond\r\n\r\n",
    "no start boundary": MULTIPART + b"just text\r\n",
    "close boundary first": MULTIPART + b"text\r\n--b1--\r\nafter\r\n--b1\r\n\r\nlost\r\n",
    "no boundary parameter": b"Content-Type: multipart/mixed\r\n\r\n--b1\r\n\r\nx\r\n",
    "boundary whitespace": MULTIPART + b"--b1 \t\r\nA: b\r\nno blank line\r\n--b1--  \r\n",
    "boundary lookalikes": MULTIPART + b"--b1x\r\n--b1\r\n\r\n --b1\r\n--b1--x\r\nz\r\n--b1--",
    "quoted boundary": b'Content-Type: multipart/mixed; boundary="a b:c"\r\n\r\n--a b:c\r\n\r\nx\r\n--a b:c--\r\n',
    "part without headers": MULTIPART + b"--b1\r\n\r\n\r\n--b1\r\n\r\n--b1--\r\n",
    "part of headers only": MULTIPART + b"--b1\r\nContent-Type: text/html\r\n--b1--\r\n",
    "nested": MULTIPART
    + b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n--b2\r\n\r\nplain\r\n--b2\r\n"
    + b"Content-Type: text/html\r\n\r\n<p>html</p>\r\n--b2--\r\nepi\r\n--b1\r\n\r\nlast\r\n--b1--\r\n",
    "nested without close": MULTIPART
    + b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\n--b2\r\n\r\ninner\r\n"
    + b"--b1\r\n\r\nouter\r\n--b1--\r\n",
    "nested without start": MULTIPART
    + b"--b1\r\nContent-Type: multipart/alternative; boundary=b2\r\n\r\nno parts\r\n--b1--\r\n",
    "digest": b"Content-Type: multipart/digest; boundary=d\r\n\r\n--d\r\n\r\nSubject: inner\r\n\r\nbody\r\n"
    + b"--d\r\nContent-Type: text/plain\r\n\r\nnot a message\r\n--d--\r\n",
    "forwarded message": MULTIPART
    + b"--b1\r\nContent-Type: message/rfc822\r\n\r\nSubject: inner\r\n\r\ninner text\r\n--b1--\r\n",
    "forwarded multipart": b"Content-Type: message/rfc822\r\n\r\n"
    + b"Content-Type: multipart/alternative; boundary=x\r\n\r\n--x\r\n",
    "LF only": b"Content-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nlf\n--b--\n",
    "8-bit body": MULTIPART
    + b"--b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\ncaf\xc3\xa9 \xff\r\n--b1--",
    "unix from in a part": MULTIPART
    + b"--b1\r\nFrom x\r\nContent-Type: text/html\r\n\r\n<b>x</b>\r\n--b1--\r\n",
    "base64 attachment": MULTIPART
    + b'--b1\r\nContent-Type: application/zip; name="a.zip"\r\nContent-Transfer-Encoding: base64\r\n\r\n'
    + b"UEsFBgAAAAAAAAAAAAAAAAAAAAAAAA==\r\n--b1--\r\n",
    "no trailing line end": MULTIPART + b"--b1\r\n\r\nx\r\n--b1--",
}


@pytest.mark.parametrize("name", sorted(TREE_CASES))
def test_tricky_multiparts_give_the_same_tree(name: str) -> None:
    assert_same_tree(TREE_CASES[name])


FALLBACKS = {
    "bare CR line ends": b"Content-Type: multipart/mixed; boundary=b\r\r--b\r\rx\r--b--\r",
    "delivery status": b"Content-Type: message/delivery-status\r\n\r\nReporting-MTA: dns; x\r\n\r\nStatus: 5.0.0\r\n",
    "adjacent boundary lines": MULTIPART + b"--b1\r\n--b1--\r\nX: y\r\n\r\nz\r\n--b1--\r\n",
    "From ends the header block": b"Subject: a\r\nFrom x\r\n\r\nbody\r\n",
    "deep nesting": b"Content-Type: message/rfc822\r\n\r\n" * (MAX_DEPTH + 2) + b"Subject: deep\r\n\r\nx\r\n",
}


@pytest.mark.parametrize("name", sorted(FALLBACKS))
def test_quirky_shapes_are_left_to_the_email_package(name: str) -> None:
    raw = FALLBACKS[name]
    assert parse_message(raw) is None
    assert parse_body(raw) == body_facts(reference(raw))


BODY_LINES = st.sampled_from(
    [
        "Content-Type: multipart/mixed; boundary=b1",
        'Content-Type: multipart/alternative; boundary="b2"',
        "Content-Type: multipart/digest; boundary=b1",
        "Content-Type: message/rfc822",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Type: text/html",
        'Content-Type: application/zip; name="a.zip"',
        "Content-Type: multipart/mixed",
        "Content-Transfer-Encoding: base64",
        "Content-Transfer-Encoding: quoted-printable",
        'Content-Disposition: attachment; filename="x.exe"',
        "Subject: =?utf-8?q?caf=C3=A9?=",
        " folded",
        "",
        "",
        " ",
        "--b1",
        "--b1--",
        "--b1 ",
        "--b2",
        "--b2--\t",
        "--b1x",
        "From someone",
        ":no name",
        "plain words",
        "aGVsbG8gd29ybGQ=",
        "caf=C3=A9 <a href='https://x.example/a'>www.example.net/b</a>",
    ]
)


@settings(max_examples=400, deadline=None)
@given(
    st.sampled_from(
        [
            "Content-Type: multipart/mixed; boundary=b1\r\n\r\n",
            'Content-Type: multipart/mixed; boundary="b2"\r\n\r\n',
            "Content-Type: message/rfc822\r\n\r\n",
            "",
        ]
    ),
    st.lists(st.tuples(BODY_LINES, st.sampled_from(["\r\n", "\r\n", "\n"])), max_size=30),
    st.booleans(),
)
def test_generated_messages_give_the_same_tree_or_none(
    top: str, lines: list[tuple[str, str]], last_eol: bool
) -> None:
    text = top + "".join(line + eol for line, eol in lines)
    if not last_eol:
        text = text.rstrip("\r\n")
    raw = text.encode()
    fast = parse_message(raw)
    if fast is not None:
        assert shape(fast) == shape(reference(raw))
    assert parse_body(raw) == body_facts(reference(raw))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["text/plain", "text/html", "application/octet-stream", "message/rfc822"]),
            st.text(st.sampled_from("ab -<>\r\n"), max_size=30),
        ),
        min_size=1,
        max_size=6,
    ),
    st.sampled_from(["\r\n", "\n"]),
    st.booleans(),
)
def test_well_formed_multiparts_are_read_by_the_fast_path(
    parts: list[tuple[str, str]], eol: str, closed: bool
) -> None:
    chunks = ["Content-Type: multipart/mixed; boundary=sep", "", "preamble"]
    for ctype, body in parts:
        lines = body.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        chunks += ["--sep", f"Content-Type: {ctype}", "", *lines]
    if closed:
        chunks += ["--sep--", "epilogue"]
    raw = eol.join(chunks).encode()
    assert_same_tree(raw)
