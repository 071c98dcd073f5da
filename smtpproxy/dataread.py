"""Reading the DATA content of one message from a stream, in chunks rather than lines.

aiosmtpd reads DATA one line at a time (a ``readuntil`` per line): for a
typical message that is the single largest CPU cost of a session. This reader
asks the stream for the next ``.<CR><LF>`` (rare inside a body) and checks
line lengths and the size limit on whole chunks with C-speed byte operations.

The semantics are aiosmtpd's: the content ends at ``<CR><LF>.<CR><LF>`` (or a
``.<CR><LF>`` first line), lines end with CRLF (a bare LF is part of a line),
the leading dot of every line that starts with one is removed (RFC 5321
§4.5.2), and when the message is too large, a line too long or a NUL byte
present (BINARYMIME is not offered) the rest is still read and discarded so the
reply comes after the final dot.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import Callable
from dataclasses import dataclass

TERMINATOR_TAIL = b".\r\n"


class DataProblem(enum.Enum):
    """Why a message was refused after its final dot."""

    TOO_BIG = "too_big"
    LINE_TOO_LONG = "line_too_long"
    NUL_BYTE = "nul_byte"
    NO_STORAGE = "no_storage"  # the budget of message bytes in flight is spent


@dataclass(slots=True)
class DataResult:
    """The unstuffed content, or the problem found (content then empty)."""

    content: bytes
    problem: DataProblem | None = None


def unstuff(raw: bytes) -> bytes:
    """Remove the transparency dot of every line that starts with a dot."""
    if raw.startswith(b"."):
        raw = raw[1:]
    return raw.replace(b"\r\n.", b"\r\n")


class _Lines:
    """Tracks the length of the line in progress across chunks."""

    def __init__(self, max_line: int) -> None:
        self.max_line = max_line  # including the CRLF
        self.current = 0
        self.cr = False  # the previous chunk ended with CR, which may pair with an LF here

    def too_long(self, chunk: bytes) -> bool:
        if self.cr:
            chunk = b"\r" + chunk
            self.current -= 1
        self.cr = chunk.endswith(b"\r")
        parts = chunk.split(b"\r\n")
        if len(parts) == 1:
            self.current += len(chunk)
            return self.current > self.max_line
        first = self.current + len(parts[0]) + 2
        self.current = len(parts[-1])
        middle = max(map(len, parts[1:-1]), default=0) + 2
        return first > self.max_line or middle > self.max_line or self.current > self.max_line


async def read_data(
    reader: asyncio.StreamReader,
    *,
    size_limit: int | None,
    max_line: int,
    charge: Callable[[int], bool] | None = None,
) -> DataResult:
    """Read up to and including the end-of-data marker; ``max_line`` counts the CRLF.

    ``charge(size)`` is asked after every chunk whether ``size`` bytes so far
    may be held (the in-flight budget); False makes the problem NO_STORAGE.
    Raises ``asyncio.IncompleteReadError`` when the stream ends first.
    """
    chunks: list[bytes] = []
    size = 0
    last2 = b"\r\n"  # DATA starts at the beginning of a line
    problem: DataProblem | None = None
    lines = _Lines(max_line)
    while True:
        try:
            chunk = await reader.readuntil(TERMINATOR_TAIL)
            found = True
        except asyncio.LimitOverrunError as err:
            # No ".\r\n" within the stream's buffer limit: take what is safe.
            chunk = await reader.readexactly(max(err.consumed, 1))
            found = False
        if found:
            before = chunk[:-3]
            tail = (last2 + before)[-2:] if before else last2
            if tail == b"\r\n":
                # The end-of-data marker: content is everything before the dot.
                if before:
                    size, last2 = _account(chunks, before, size, last2)
                    if problem is None:
                        problem = _check(lines, before, size, size_limit, charge)
                break
        size, last2 = _account(chunks, chunk, size, last2)
        if problem is None:
            problem = _check(lines, chunk, size, size_limit, charge)
        if problem is not None:
            chunks.clear()  # keep reading to the final dot, but hold nothing
    if problem is not None:
        return DataResult(b"", problem)
    return DataResult(unstuff(b"".join(chunks)))


def _account(chunks: list[bytes], chunk: bytes, size: int, last2: bytes) -> tuple[int, bytes]:
    chunks.append(chunk)
    return size + len(chunk), (last2 + chunk)[-2:]


def _check(
    lines: _Lines, chunk: bytes, size: int, size_limit: int | None, charge: Callable[[int], bool] | None
) -> DataProblem | None:
    if size_limit and size > size_limit:
        return DataProblem.TOO_BIG
    if charge is not None and not charge(size):
        return DataProblem.NO_STORAGE
    if lines.too_long(chunk):
        return DataProblem.LINE_TOO_LONG
    if b"\x00" in chunk:
        return DataProblem.NUL_BYTE
    return None
