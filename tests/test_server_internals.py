"""Pins what InboundSMTP takes over from aiosmtpd: its attributes and its address parser."""

from __future__ import annotations

import asyncio

from aiosmtpd.smtp import SMTP
from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.app import App
from smtpproxy.config import build_config
from smtpproxy.server import _SIMPLE_PATH, InboundSMTP, _FlushingReader


async def test_inbound_smtp_sets_every_attribute_aiosmtpd_init_sets(tmp_path) -> None:
    """aiosmtpd's __init__ is skipped for speed: a new aiosmtpd attribute must fail here."""
    reference = SMTP(object(), loop=asyncio.get_running_loop())
    app = App(build_config({"rules": None, "metrics": None}))
    ours = InboundSMTP(app)
    missing = set(vars(reference)) - set(vars(ours))
    assert not missing, f"aiosmtpd sets attributes InboundSMTP does not: {sorted(missing)}"
    # The per-connection size-limit dict must not be aiosmtpd's shared class attribute.
    assert ours.command_size_limits is not SMTP.command_size_limits


atext = st.sampled_from(list("abcxyzABC0129!#$%&'*+/=?^_`{|}~-.é"))
labels = st.text(st.sampled_from(list("abz09-é")), min_size=1, max_size=8)


@settings(max_examples=400, deadline=None)
@given(
    local=st.text(atext, min_size=1, max_size=20),
    domain=st.lists(labels, min_size=1, max_size=4).map(".".join),
    rest=st.sampled_from(["", " SIZE=100", " BODY=8BITMIME SMTPUTF8"]),
)
def test_fast_address_path_agrees_with_aiosmtpd_parser(local: str, domain: str, rest: str) -> None:
    arg = f"<{local}@{domain}>{rest}"
    m = _SIMPLE_PATH.match(arg)
    if m is None or ".." in m.group(1):
        return  # the full parser handles it
    loop = asyncio.new_event_loop()
    try:
        reference = SMTP(object(), loop=loop)
        ours = InboundSMTP._getaddr(reference, arg)  # type: ignore[arg-type]
        assert reference._getaddr(arg) == ours
    finally:
        loop.close()


async def test_stream_reader_keeps_its_buffer_where_the_flushing_reader_reads_it() -> None:
    """_FlushingReader reads StreamReader._buffer (as aiosmtpd does): a change must fail here."""
    reader = _FlushingReader(loop=asyncio.get_running_loop(), limit=100)
    assert isinstance(reader._buffer, bytearray)  # type: ignore[attr-defined]
    reader.feed_data(b"NOOP\r\nNO")
    assert reader.has_line()
    flushed: list[int] = []
    reader.before_wait = lambda: flushed.append(1)
    assert await reader.readuntil(b"\r\n") == b"NOOP\r\n" and not flushed  # answered from the buffer
    reader.feed_eof()
    assert await reader.read(2) == b"NO" and not flushed
    assert await reader.read(2) == b"" and flushed  # would wait: held replies go first
