"""Header splitting is linear in the header size: one folded field cannot stall the proxy."""

from __future__ import annotations

import asyncio
import socket
import time

import dkim
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.auth.dkimhash import parse_message
from smtpproxy.headers import _fields, apply_edits, header_values
from tests.backends import RecordingBackend
from tests.smtpclient import RawClient


def _reference_fields(header: bytes) -> list[bytes]:
    """Line by line, each field's lines joined once: the semantics, obviously linear."""
    fields: list[list[bytes]] = []
    for line in header.splitlines(keepends=True):
        if fields and line[:1] in (b" ", b"\t"):
            fields[-1].append(line)
        else:
            fields.append([line])
    return [b"".join(lines) for lines in fields]


def _banner_seconds(host: str, port: int) -> float:
    """Seconds from connect to the banner, for a client that starts once the message is in."""
    time.sleep(0.5)
    with socket.create_connection((host, port), timeout=30) as sock:
        started = time.monotonic()
        assert sock.recv(512).startswith(b"220 ")
        return time.monotonic() - started


def _folded(lines: int) -> bytes:
    return b"From: a@b.example\r\nX-Folded: a\r\n" + b" b\r\n" * lines + b"Subject: x\r\n"


_HEADER_TEXT = st.lists(
    st.sampled_from([b"\r\n", b"\n", b"\r", b" ", b"\t", b"A: b", b"x", b":", b" c", b"\tc"]), max_size=20
).map(b"".join)


@settings(max_examples=2000, deadline=None)
@given(_HEADER_TEXT)
def test_fields_match_the_line_by_line_reference(header: bytes) -> None:
    assert _fields(header) == _reference_fields(header)


def test_a_folded_field_of_10k_and_100k_lines_is_one_field_sliced_once() -> None:
    for lines in (10_000, 100_000):
        header = _folded(lines)
        fields = _fields(header)
        assert fields == _reference_fields(header)
        # Three fields, whatever the number of continuation lines: the work is
        # one scan of the header plus one slice per field, not a copy per line.
        assert len(fields) == 3 and sum(map(len, fields)) == len(header)
        message = header + b"\r\nbody\r\n"
        assert header_values(message, "x-folded") == ["a" + " b" * lines]
        assert apply_edits(message, [], prepend=b"R: x\r\n", drop=lambda f: False) == b"R: x\r\n" + message


def test_dkim_parse_of_a_folded_field_matches_dkimpy() -> None:
    for sep in (b"\r\n", b"\n"):
        message = (_folded(10_000) + b"\r\nbody\r\n").replace(b"\r\n", sep)
        headers, body = dkim.rfc822_parse(message)
        assert parse_message(message) == ([tuple(h) for h in headers], body)


async def test_a_400k_line_folded_header_does_not_stall_other_sessions(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy({"limits": {"max_line_length": 1001}})
    message = b"X-Folded: a\r\n" + b" b\r\n" * 400_000 + b"Subject: big\r\n\r\nbody\r\n"
    async with RawClient(proxy.host, proxy.port, timeout=60) as c:
        await c.connect()
        await c.cmd("EHLO c.test")
        await c.cmd("MAIL FROM:<s@sender.example>")
        await c.cmd("RCPT TO:<user@example.org>")
        assert (await c.cmd("DATA")).code == 354
        await c.send(message + b".\r\n")
        # While the proxy works on that message, another client must be greeted.
        # Its clock runs in a thread: the proxy's event loop is the one that stalls.
        greeted = asyncio.get_running_loop().run_in_executor(None, _banner_seconds, proxy.host, proxy.port)
        answer = asyncio.ensure_future(c.reply())
        waited = await greeted
        print(f"banner after {waited:.3f} s while a 400k-line folded header was processed")
        assert waited < 5.0, f"banner after {waited:.1f} s"
        r = await answer
        assert r.code in (250, 550, 552), r
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220
