"""What we take from our libraries' private side is pinned: an upgrade is a decision, not a surprise.

Each entry is a function or method of a library that our code overrides,
replaces or calls although it is not public API, with a hash of its source at
the version ``pyproject.toml`` pins. When an upgrade changes one, this test
names it: read the library's change, adapt (or drop) our code that depends on
it, then record the new hash. The third element says which of our code depends on it.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import sys
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.auth import dkimspeed

PINNED = [
    (
        "aiosmtpd.smtp:SMTP.__init__",
        "8a9ca80f23ad9bf2",
        "server.InboundSMTP.__init__ skips it and sets its attributes itself",
    ),
    (
        "aiosmtpd.smtp:SMTP._handle_client",
        "0e4d096403af6c74",
        "server overrides it: connect stage before the banner",
    ),
    (
        "aiosmtpd.smtp:SMTP._timeout_cb",
        "10a7351f9bec2818",
        "server overrides it: 421 4.4.2, busy connections",
    ),
    ("aiosmtpd.smtp:SMTP._reset_timeout", "fef19b94d28dff31", "server calls it"),
    ("aiosmtpd.smtp:SMTP._call_handler_hook", "6ff23a6634ea0307", "server overrides and calls it"),
    ("aiosmtpd.smtp:SMTP._getaddr", "0aeb21c56ac1260e", "server overrides it: fast path, DSN set aside"),
    ("aiosmtpd.smtp:SMTP.smtp_MAIL", "80dd938e7791acfb", "server wraps it (AUTH= out); DSN set aside"),
    ("aiosmtpd.smtp:SMTP.smtp_RCPT", "a0d6605883c0e608", "server._getaddr: DSN parameters go around its 555"),
    ("aiosmtpd.smtp:SMTP._set_post_data_state", "1dc8a8abca2a8164", "server.smtp_DATA calls it"),
    ("aiosmtpd.smtp:SMTP._set_rset_state", "9ff64b71daa68e63", "server.handle_exception calls it"),
    ("aiosmtpd.smtp:SMTP.smtp_DATA", "3a33f30d3fd6d02f", "server replaces it: chunked DATA reader"),
    ("aiosmtpd.smtp:SMTP.smtp_STARTTLS", "6565289f4131fa13", "server wraps it"),
    (
        "aiosmtpd.smtp:SMTP.smtp_AUTH",
        "79078b308377ac48",
        "server wraps it: mechanism names, then handle_AUTH",
    ),
    ("aiosmtpd.smtp:SMTP.smtp_NOOP", "3b50ce77fba2859a", "server counts it as a junk command first"),
    ("aiosmtpd.smtp:SMTP.smtp_RSET", "12a5581e3d84104e", "server counts it as a junk command first"),
    ("aiosmtpd.smtp:SMTP.smtp_VRFY", "3fc88a3b6c62da09", "server counts it as a junk command first"),
    ("aiosmtpd.smtp:SMTP.smtp_EXPN", "6b2762e1ca53a846", "server counts it as a junk command first"),
    ("aiosmtpd.smtp:SMTP.smtp_HELP", "658586a0cbd741b7", "server counts it as a junk command first"),
    ("aiosmtpd.smtp:SMTP.smtp_HELO", "c61e63948c38ce28", "server counts a repeated greeting as junk"),
    ("aiosmtpd.smtp:SMTP.smtp_EHLO", "1d91592dd954c4cd", "server counts a repeated greeting as junk"),
    ("aiosmtpd.smtp:SMTP.push", "15f4f1de5e30c337", "server overrides it: replies held and written together"),
    ("aiosmtpd.smtp:SMTP.handle_exception", "33be80d97d2d75ee", "server overrides it: 451 4.3.0"),
    ("aiosmtpd.smtp:SMTP.data_received", "e57e2bc9772342e5", "server overrides it: idle timer"),
    ("aiosmtpd.smtp:SMTP.connection_made", "77a45df5065bba34", "server overrides it"),
    ("aiosmtpd.smtp:SMTP.connection_lost", "d3bf6349bc3c25c1", "server overrides it"),
    (
        "aiosmtplib.protocol:SMTPProtocol.write",
        "4b11ce8fce2f2f16",
        "backend.smtp writes the DATA content itself",
    ),
    (
        "aiosmtplib.protocol:SMTPProtocol.read_response",
        "0b9d810b358b1b0b",
        "backend.smtp reads the reply to the content",
    ),
    ("dkim.crypto:str2int", "40c6e8a4e3a12b11", "auth.dkimspeed replaces it"),
    ("dkim.crypto:int2str", "4995e534401219fa", "auth.dkimspeed replaces it"),
    ("dkim:ARC.__init__", "6ae6eb0b80853f02", "auth.arc.Arc calls it"),
    ("dkim:DomainSigner.verify_sig", "32c48c63dfd05f78", "auth.arc.Arc overrides it"),
    ("spf:query.__init__", "c87cfefbb6178a93", "auth.spf._Query calls it"),
    ("spf:query.dns", "63ad0ef0805e0745", "auth.spf._Query overrides it: answers from our resolver"),
    ("spf:query.validated_ptrs", "2b0b3bc7714f02e6", "auth.spf._Query overrides it"),
]

# The standard library's, as recorded on Python 3.11 (the version CI runs).
if sys.version_info[:2] == (3, 11):
    PINNED += [
        (
            "asyncio.streams:StreamReader.readuntil",
            "81e08fef17901a0e",
            "server._FlushingReader reads _buffer",
        ),
        (
            "asyncio.streams:StreamReader.readexactly",
            "70d6ba8c778f44ed",
            "server._FlushingReader reads _buffer",
        ),
        ("asyncio.streams:StreamReader.read", "54bc5378c6eec10b", "server._FlushingReader reads _buffer"),
    ]

# Replaced at import by smtpproxy.auth.dkimspeed, which keeps the originals.
REPLACED = {"dkim.crypto:str2int": dkimspeed.ORIGINAL[0], "dkim.crypto:int2str": dkimspeed.ORIGINAL[1]}


def resolve(path: str) -> Any:
    if path in REPLACED:
        return REPLACED[path]
    module, _, qualname = path.partition(":")
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj


def source_hash(obj: Any) -> str:
    return hashlib.sha256(inspect.getsource(obj).encode()).hexdigest()[:16]


@pytest.mark.parametrize(("path", "expected", "why"), PINNED, ids=[p for p, _, _ in PINNED])
def test_private_library_code_we_depend_on_is_unchanged(path: str, expected: str, why: str) -> None:
    try:
        obj = resolve(path)
    except AttributeError:
        pytest.fail(f"{path} is gone: the code of ours that overrides or calls it must change")
    assert source_hash(obj) == expected, (
        f"{path} changed in this version of its library: review the code of ours that depends on it "
        f"({why}), then record its new hash"
    )


def test_the_pins_bound_the_library_versions() -> None:
    """The versions whose private code the hashes describe are the only ones pyproject allows."""
    text = (Path(__file__).resolve().parent.parent / "pyproject.toml").read_text()
    for requirement in (
        "aiosmtpd>=1.4.6,<1.5",
        "aiosmtplib>=5.1,<5.2",
        "dkimpy>=1.1.8,<1.2",
        "pyspf>=2.0.14,<2.1",
    ):
        assert f'"{requirement}"' in text, requirement


def test_no_import_circles_among_our_modules() -> None:
    """Not even through TYPE_CHECKING imports: each module's dependencies stay one way."""
    import ast

    root = Path(__file__).resolve().parent.parent / "smtpproxy"
    modules = {}
    for path in root.rglob("*.py"):
        name = ".".join(path.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("smtpproxy"):
                found.add(node.module)
                found.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names)
        graph[name] = {m for m in found if m in modules and m != name}
    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert circles == [], circles
