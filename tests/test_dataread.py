"""The chunked DATA reader against a line-by-line reference, fed in chunks of every size."""

from __future__ import annotations

import asyncio

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.dataread import DataProblem, read_data


def reference(stream: bytes, size_limit: int | None, max_line: int) -> tuple[bytes, set[DataProblem], bytes]:
    """aiosmtpd's semantics, one CRLF-terminated line at a time: (content, problems, leftover).

    When a message has more than one problem (too big, a too long line, a NUL), any of their replies is right.
    """
    lines: list[bytes] = []
    pos = 0
    size = 0
    problems: set[DataProblem] = set()
    while True:
        end = stream.index(b"\r\n", pos) + 2
        line = stream[pos:end]
        pos = end
        if line == b".\r\n":
            break
        size += len(line)
        if size_limit and size > size_limit:
            problems.add(DataProblem.TOO_BIG)
        if len(line) > max_line:
            problems.add(DataProblem.LINE_TOO_LONG)
        if b"\x00" in line:
            problems.add(DataProblem.NUL_BYTE)
        lines.append(line[1:] if line.startswith(b".") else line)
    content = b"" if problems else b"".join(lines)
    return content, problems, stream[pos:]


async def run(stream: bytes, chunk: int, size_limit: int | None, max_line: int, limit: int = 64):
    reader = asyncio.StreamReader(limit=limit)

    async def feed() -> None:
        for i in range(0, len(stream), chunk):
            reader.feed_data(stream[i : i + chunk])
            await asyncio.sleep(0)

    feeder = asyncio.ensure_future(feed())
    result = await read_data(reader, size_limit=size_limit, max_line=max_line)
    await feeder
    leftover = reader._buffer  # type: ignore[attr-defined]
    return result.content, result.problem, bytes(leftover)


line_parts = st.sampled_from([b"a", b"b" * 30, b".", b"..", b"\n", b"\r", b" ", b"x.", b"\xc3\xa9", b"\x00"])
lines = st.lists(line_parts, max_size=6).map(b"".join).map(lambda s: s.replace(b"\r", b"") + b"\r\n")
messages = st.lists(lines, max_size=12).map(b"".join)


@settings(max_examples=300, deadline=None)
@given(
    body=messages,
    chunk=st.sampled_from([1, 2, 3, 5, 16, 4096]),
    size_limit=st.sampled_from([None, 40, 200]),
    max_line=st.sampled_from([10, 40, 1000]),
    after=st.sampled_from([b"", b"QUIT\r\n", b"MAIL FROM:<a@b>\r\n"]),
)
def test_chunked_reader_matches_line_reader(
    body: bytes, chunk: int, size_limit: int | None, max_line: int, after: bytes
) -> None:
    stream = body + b".\r\n" + after
    content, problems, leftover = reference(stream, size_limit, max_line)
    got_content, got_problem, got_leftover = asyncio.run(run(stream, chunk, size_limit, max_line))
    assert (got_content, got_leftover) == (content, leftover)
    assert (got_problem in problems) if problems else got_problem is None


def test_empty_message_and_dot_lines() -> None:
    assert asyncio.run(run(b".\r\nQUIT\r\n", 1, None, 100)) == (b"", None, b"QUIT\r\n")
    got = asyncio.run(run(b"..\r\n...x\r\nend.\r\n.\r\n", 4096, None, 100))
    assert got == (b".\r\n..x\r\nend.\r\n", None, b"")


def test_long_message_beyond_the_stream_limit() -> None:
    body = (b"y" * 70 + b"\r\n") * 2000
    got = asyncio.run(run(body + b".\r\n", 4096, None, 1000, limit=8192))
    assert got == (body, None, b"")


def test_oversized_message_is_read_to_the_end_and_refused() -> None:
    body = (b"z" * 70 + b"\r\n") * 100
    got = asyncio.run(run(body + b".\r\nNOOP\r\n", 16, 1000, 1000))
    assert got == (b"", DataProblem.TOO_BIG, b"NOOP\r\n")


def test_nul_byte_is_refused_after_the_final_dot() -> None:
    # "\r\n\0.\r\n": the end of data for a backend that strips NULs.
    got = asyncio.run(run(b"Subject: a\r\n\r\none\r\n\x00.\r\ntwo\r\n.\r\nNOOP\r\n", 3, None, 1000))
    assert got == (b"", DataProblem.NUL_BYTE, b"NOOP\r\n")
