"""A fast stand-in for ``email.message_from_bytes(raw, policy=compat32)`` and its header parser.

The stdlib feedparser reads a message line by line in Python: about 1 ms for a
20 KB multipart, most of the rules' cost. Here header blocks are read line by
line (they are short) and bodies are cut at boundary lines found with
``str.find`` (bodies are long). The result is the same tree of compat32
``Message`` objects the email package builds (same headers, default types,
payload strings, nesting), so everything downstream (``walk``,
``get_payload(decode=True)``, ``get_filename``, charsets) is still the email
package's own code. Not reproduced: defects, preambles and epilogues (rules
never read them).

Shapes whose feedparser reading is too quirky to mirror make
:func:`parse_message` return None, and the caller falls back to the email
package: a bare CR line end, ``message/delivery-status``, a ``From `` line
ending a header block (the feedparser pushes it back into the body), two
boundary lines in a row, and nesting deeper than :data:`MAX_DEPTH`.
"""

from __future__ import annotations

import re
from email.message import Message

MAX_DEPTH = 64  # nested multiparts and message/* parts before handing over to the email package

# email.feedparser.headerRE: a header line, a continuation line or a unix "From " line.
_HEADER_LINE = re.compile(r"From |[\041-\071\073-\176]*:|[\t ]")
# One line with its line end; the feedparser (StringIO, newline="") ends lines at \r\n, \r or \n.
_LINE = re.compile(r"[^\r\n]*(?:\r\n|\r|\n)?")

Field = tuple[str, str]


class _Unsupported(Exception):
    """A shape the feedparser reads in a way this module does not mirror."""


def header_block(text: str, pos: int, end: int) -> tuple[list[str], int]:
    """The header lines (line ends kept) starting at ``pos``, and where the body starts.

    Like the feedparser: the block ends at the first line that is neither a
    field, a continuation nor a "From " line; a blank line there is consumed,
    any other line is the first line of the body.
    """
    lines: list[str] = []
    while pos < end:
        found = _LINE.match(text, pos, end)
        if found is None:  # cannot happen: the pattern matches at least one character here
            break
        line = found.group()
        if not _HEADER_LINE.match(line):
            if line[0] in "\r\n":
                pos = found.end()
            break
        lines.append(line)
        pos = found.end()
    return lines, pos


def _source_parse(lines: list[str]) -> Field:
    # email.policy.Compat32.header_source_parse: the value keeps its folding line ends.
    name, value = lines[0].split(":", 1)
    value = value.lstrip(" \t") + "".join(lines[1:])
    return name, value.rstrip("\r\n")


def parse_fields(lines: list[str]) -> tuple[list[Field], str | None, bool]:
    """Fields of a header block as the feedparser reads them (``_parse_headers``).

    Returns the (name, raw value) fields, the unix "From " line when it is the
    first line, and whether a "From " line ended the block (the feedparser
    then reads it as the first body line).
    """
    fields: list[Field] = []
    unixfrom: str | None = None
    current: list[str] = []
    for lineno, line in enumerate(lines):
        if line[0] in " \t":
            if current:  # a continuation before any field is dropped, as the feedparser does
                current.append(line)
            continue
        if current:
            fields.append(_source_parse(current))
            current = []
        if line.startswith("From "):
            if lineno == 0:
                unixfrom = _strip_eol(line)
            elif lineno == len(lines) - 1:
                return fields, unixfrom, True
            continue
        if line.find(":") == 0:  # "Missing header name": skipped
            continue
        current = [line]
    if current:
        fields.append(_source_parse(current))
    return fields, unixfrom, False


def _strip_eol(line: str) -> str:
    # email.feedparser.NLCRE_eol: one trailing \r\n, \r or \n.
    if line.endswith("\r\n"):
        return line[:-2]
    if line.endswith(("\r", "\n")):
        return line[:-1]
    return line


def raw_header_fields(message: bytes) -> list[Field]:
    """The top-level header fields of ``message``, as compat32's ``raw_items()`` gives them.

    Equivalent to ``BytesHeaderParser(policy=compat32).parsebytes(message).raw_items()``
    without reading the body. 8-bit bytes become surrogate escapes, as there.
    """
    # Each of these pairs starts a blank line at found + 1, and the header block ends at or
    # before any blank line: read no further than one of them (bodies may be big).
    cut = len(message)
    for blank in (b"\n\r", b"\n\n", b"\r\r"):  # CRLF first; later searches stop at the cut so far
        found = message.find(blank, 0, cut)
        if found >= 0:
            cut = found
    head = message[: cut + 4]
    text = head.decode("ascii", "surrogateescape")
    lines, _ = header_block(text, 0, len(text))
    return parse_fields(lines)[0]


def _boundary_lines(text: str, sep: str, pos: int, end: int) -> list[tuple[int, int, bool]]:
    """(line start, line end, is close) of every boundary line in [pos, end).

    A boundary line is ``--boundary``, optionally ``--``, then only spaces and
    tabs (the feedparser's ``boundaryre``); ``pos`` is always a line start, and
    the text has no bare CR (:func:`parse_message` checks), so lines end at LF.
    """
    out: list[tuple[int, int, bool]] = []
    i = text.find(sep, pos, end)
    while i >= 0:
        if i == pos or text[i - 1] == "\n":
            newline = text.find("\n", i, end)
            line_end = end if newline < 0 else newline + 1
            rest = _strip_eol(text[i + len(sep) : line_end])
            close = rest.startswith("--")
            if not (rest[2:] if close else rest).strip(" \t"):
                out.append((i, line_end, close))
                if close:
                    break  # nothing after the close boundary is parsed
            i = text.find(sep, line_end, end)
        else:
            i = text.find(sep, i + 1, end)
    return out


def _multipart(msg: Message, ctype: str, text: str, body: int, end: int, depth: int) -> None:
    boundary = msg.get_boundary()
    if boundary is None:
        msg.set_payload(text[body:end])
        return
    lines = _boundary_lines(text, "--" + boundary, body, end)
    if not lines or lines[0][2]:  # no start boundary: the text is the payload (a leaf)
        msg.set_payload(text[body : lines[0][0] if lines else end])
        return
    default = "message/rfc822" if ctype == "multipart/digest" else None
    for index, (_, start, close) in enumerate(lines):
        if close:
            break
        following = index + 1 < len(lines)
        part_end = lines[index + 1][0] if following else end
        if following and part_end == start:
            raise _Unsupported("two boundary lines in a row")
        msg.attach(_parse(text, start, part_end, default, depth + 1, strip=True))


def _parse(text: str, pos: int, end: int, default_type: str | None, depth: int, strip: bool) -> Message:
    """One message or part; ``strip``: a multipart's part, whose last line end is the boundary's."""
    if depth > MAX_DEPTH:
        raise _Unsupported("nested too deep")
    msg = Message()
    if default_type is not None:
        msg.set_default_type(default_type)
    lines, body = header_block(text, pos, end)
    fields, unixfrom, pushed_back = parse_fields(lines)
    if pushed_back:
        raise _Unsupported("a From line ends the header block")
    for name, value in fields:
        msg.set_raw(name, value)
    if unixfrom is not None:
        msg.set_unixfrom(unixfrom)
    ctype = msg.get_content_type()
    if ctype == "message/delivery-status":
        raise _Unsupported("message/delivery-status")
    maintype = ctype.partition("/")[0]
    if maintype == "message":
        # The feedparser strips the line end from the last message it created: the innermost one.
        msg.attach(_parse(text, body, end, None, depth + 1, strip))
    elif maintype == "multipart":
        # A multipart keeps its text as is, even when it has no parts (RFC 2046 stripping
        # applies to its epilogue then, which rules do not read).
        _multipart(msg, ctype, text, body, end, depth)
    else:
        # RFC 2046: the line end before a boundary belongs to the boundary.
        msg.set_payload(_strip_eol(text[body:end]) if strip else text[body:end])
    return msg


def parse_message(message: bytes) -> Message | None:
    """The message as ``email.message_from_bytes(message, policy=compat32)`` builds it, or None.

    None for the shapes listed in the module docstring: use the email package then.
    """
    text = message.decode("ascii", "surrogateescape")
    if text.count("\r") != text.count("\r\n"):
        return None
    try:
        return _parse(text, 0, len(text), None, 0, strip=False)
    except (_Unsupported, RecursionError):
        return None
