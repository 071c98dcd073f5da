"""The milter through a real socket, driven by an independent MTA-side client (PyPI ``miltertest``)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from miltertest import MilterConnection
from miltertest import constants as c

from smtpproxy.app import App
from smtpproxy.config import build_config
from smtpproxy.milter import codec, connection
from smtpproxy.stages import Check
from tests.conftest import proxy_config
from tests.dnsserver import DnsServer

RULES = """\
- name: no_exe
  if: {subject: {contains: reject me}}
  then: {reject: {code: 554, enhanced: "5.7.1", text: "Executable attachments are not accepted"}}
- name: later
  if: {subject: {contains: tempfail me}}
  then: {tempfail: {code: 451, enhanced: "4.7.1", text: "Try again later, by rule"}}
- name: hold
  if: {subject: {contains: quarantine me}}
  then: quarantine
- name: tag
  if: {subject: {contains: tag me}}
  then: {tag_subject: "[TAG]"}
"""
# miltertest cannot read SMFIR_SETSYMLIST: it offers every v6 action but that one.
ACTIONS = c.SMFI_V6_ACTS & ~c.SMFIF_SETSYMLIST
QUIET = {"spf": {"enabled": False}, "dkim": {"enabled": False}, "arc": {"enabled": False}}


@pytest.fixture
async def milter(tmp_path: Path, dns_server: DnsServer) -> AsyncIterator[App]:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "10-test.yaml").write_text(RULES)
    data = proxy_config(
        None, {**QUIET, "listen": None, "milter": {"listen": "127.0.0.1:0"}, "rules": "rules"}
    )
    data["dns"]["nameservers"] = [dns_server.address]
    app = App(build_config(data, base_dir=tmp_path))
    await app.start()
    yield app
    await app.stop(grace=0.5)


def session(port: int, subject: str, headers: list[tuple[str, str]] | None = None) -> list[Any]:
    """One SMTP session as an MTA reports it; the replies to end of message."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        m = MilterConnection(sock)
        _, protocol = m.optneg_mta(ACTIONS)
        assert protocol & c.SMFIP_NR_HDR and protocol & c.SMFIP_HDR_LEADSPC
        m.send_macro(c.SMFIC_CONNECT, j="mx.example")
        assert (
            m.send_ar(
                c.SMFIC_CONNECT, hostname="client.example", family="4", port=40000, address="192.0.2.7"
            )[0]
            == "c"
        )
        assert m.send_ar(c.SMFIC_HELO, helo="client.example")[0] == "c"
        assert m.send_ar(c.SMFIC_MAIL, args=["<someone@sender.example>"])[0] == "c"
        assert m.send_ar(c.SMFIC_RCPT, args=["<user@example.org>"])[0] == "c"
        for name, value in [("Subject", f" {subject}"), *(headers or [])]:
            m._send(c.SMFIC_HEADER, name=name, value=value)  # no reply: SMFIP_NR_HDR
        m._send(c.SMFIC_EOH)  # no reply: SMFIP_NR_EOH
        m._send(c.SMFIC_BODY, buf="Hello.\r\n")  # no reply: SMFIP_NR_BODY
        m.send_macro(c.SMFIC_BODYEOB, i="QUEUE1")
        replies = m.send_eom()
        if replies[-1][0] == c.SMFIR_QUARANTINE:  # miltertest takes it for the final reply; it is not
            replies.append(m.recv())
        m._send(c.SMFIC_QUIT)
        assert sock.recv(1) == b""  # we close after QUIT
        return replies


async def run(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def test_clean_message_gets_our_authentication_results_at_the_top(milter: App) -> None:
    replies = await run(session, milter.milter.port, "hello")  # type: ignore[union-attr]
    assert replies[-1][0] == c.SMFIR_ACCEPT
    inserted = [r for r in replies if r[0] == c.SMFIR_INSHEADER]
    assert inserted[0][1]["index"] == 0 and inserted[0][1]["name"] == "Authentication-Results"
    assert inserted[0][1]["value"].startswith(" mx.test.example;")


async def test_rule_reject_and_tempfail_reply_with_the_rules_text(milter: App) -> None:
    port = milter.milter.port  # type: ignore[union-attr]
    replies = await run(session, port, "please reject me")
    assert replies[-1][0] == c.SMFIR_REPLYCODE
    assert replies[-1][1]["smtpcode"] == "554" and "5.7.1 Executable attachments" in str(
        replies[-1][1]["text"]
    )
    replies = await run(session, port, "tempfail me")
    assert replies[-1][1]["smtpcode"] == "451" and "Try again later, by rule" in str(replies[-1][1]["text"])


async def test_quarantine_and_subject_tag(milter: App) -> None:
    port = milter.milter.port  # type: ignore[union-attr]
    replies = await run(session, port, "quarantine me")
    assert [r[0] for r in replies][-2:] == [c.SMFIR_QUARANTINE, c.SMFIR_ACCEPT]
    assert replies[-2][1]["reason"] == "hold"
    replies = await run(session, port, "tag me")
    changed = [r[1] for r in replies if r[0] == c.SMFIR_CHGHEADER]
    assert changed == [{"index": 1, "name": "Subject", "value": " [TAG] tag me"}]


async def test_forged_authentication_results_are_deleted_by_index(milter: App) -> None:
    headers = [
        ("Authentication-Results", " other.example; spf=pass"),
        ("Authentication-Results", " mx.test.example; dkim=pass"),
        ("Authentication-Results", " MX.TEST.EXAMPLE; spf=pass"),
    ]
    replies = await run(session, milter.milter.port, "hello", headers)  # type: ignore[union-attr]
    deleted = [r[1] for r in replies if r[0] == c.SMFIR_CHGHEADER]
    assert deleted == [
        {"index": 3, "name": "Authentication-Results", "value": ""},
        {"index": 2, "name": "Authentication-Results", "value": ""},
    ]


def bad_then_good(port: int, garbage: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(garbage)
        closed = b"".join(iter(lambda: sock.recv(4096), b""))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert MilterConnection(sock).optneg_mta(ACTIONS)  # still serving
    return closed


@pytest.mark.parametrize(
    ("garbage", "kind"),
    [
        (b"\xff\xff\xff\xffO", "oversized"),
        (codec.packet("O", b"\0\0\0\6\0\0\0\0\0\0\0\0") + codec.packet("H", b"no nul"), "malformed"),
        (codec.packet("M", b"<a@b>\0"), "out_of_order"),
        (codec.packet("O", b"\0\0\0\6\0\0\0\0\0\0\0\0") + codec.packet("M", b"<a@b>\0"), "out_of_order"),
        (codec.packet("O", b"\0\0\0\6\0\0\0\0\0\0\0\0") + codec.packet("Z"), "unknown"),
    ],
)
async def test_bad_packets_close_the_connection_and_the_next_mta_is_served(
    milter: App, garbage: bytes, kind: str
) -> None:
    await run(bad_then_good, milter.milter.port, garbage)  # type: ignore[union-attr]
    assert milter.metrics.milter_protocol_errors.labels(kind)._value.get() == 1  # type: ignore[attr-defined]


def aborted_then_clean(port: int) -> Any:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        m = MilterConnection(sock)
        m.optneg_mta(ACTIONS)
        m.send_ar(c.SMFIC_CONNECT, hostname="unknown", family="4", port=1, address="192.0.2.8")
        m.send_ar(c.SMFIC_MAIL, args=["<a@sender.example>"])
        m.send_ar(c.SMFIC_RCPT, args=["<user@example.org>"])
        m._send(c.SMFIC_HEADER, name="Subject", value=" first")
        m._send(c.SMFIC_BODY, buf="x" * 60000)
        m._send(c.SMFIC_ABORT)
        m.send_ar(c.SMFIC_MAIL, args=["<a@sender.example>"])
        m.send_ar(c.SMFIC_RCPT, args=["<user@example.org>"])
        m._send(c.SMFIC_HEADER, name="Subject", value=" second")
        m._send(c.SMFIC_EOH)
        return m.send_eom()


async def test_abort_mid_message_frees_it_and_the_next_transaction_runs(milter: App) -> None:
    replies = await run(aborted_then_clean, milter.milter.port)  # type: ignore[union-attr]
    assert replies[-1][0] == c.SMFIR_ACCEPT
    words = {
        s.labels.get("action")
        for m in milter.metrics.messages_by_mode.collect()
        for s in m.samples
        if s.value and s.labels.get("mode") == "milter"
    }
    assert words == {"aborted", "delivered"}


async def test_many_concurrent_mta_connections(milter: App) -> None:
    port = milter.milter.port  # type: ignore[union-attr]
    results = await asyncio.gather(*(run(session, port, f"hello {i}") for i in range(40)))
    assert all(r[-1][0] == c.SMFIR_ACCEPT for r in results)
    assert not milter.milter.connections  # type: ignore[union-attr]


def big_message(port: int) -> Any:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        m = MilterConnection(sock)
        m.optneg_mta(ACTIONS)
        m.send_ar(c.SMFIC_CONNECT, hostname="unknown", family="4", port=1, address="192.0.2.8")
        m.send_ar(c.SMFIC_MAIL, args=["<a@sender.example>"])
        m.send_ar(c.SMFIC_RCPT, args=["<user@example.org>"])
        m._send(c.SMFIC_EOH)
        for _ in range(2):  # 120 kB, past the limit; no reply to either (SMFIP_NR_BODY)
            m._send(c.SMFIC_BODY, buf="x" * 60000)
        replies = m.send_eom()
        # The connection goes on: an unknown command is answered (Postfix then says 502 itself).
        sock.sendall(codec.packet("U", b"XYZZY\0"))  # miltertest cannot encode SMFIC_UNKNOWN
        unknown = m.recv()
        return replies, unknown


async def test_body_past_the_size_limit_gets_the_proxys_552(tmp_path: Path, dns_server: DnsServer) -> None:
    data = proxy_config(None, {**QUIET, "listen": None, "milter": {"listen": "127.0.0.1:0"}})
    data["limits"] = {"max_message_size": 100_000}
    app = App(build_config(data, base_dir=tmp_path))
    await app.start()
    try:
        replies, unknown = await run(big_message, app.milter.port)  # type: ignore[union-attr]
    finally:
        await app.stop(grace=0.5)
    assert [r[0] for r in replies] == ["y"]
    assert replies[0][1]["smtpcode"] == "552"
    assert "5.3.4 Error: Too much mail data" in str(replies[0][1]["text"])
    assert unknown[0] == c.SMFIR_CONTINUE


class SlowContent(Check):
    """A DATA check slower than the progress interval."""

    name = "slow"

    async def data(self, session: Any, txn: Any) -> None:
        await asyncio.sleep(0.5)


def count_progress(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        m = MilterConnection(sock)
        m.optneg_mta(ACTIONS)
        m.send_ar(c.SMFIC_CONNECT, hostname="unknown", family="4", port=1, address="192.0.2.8")
        m.send_ar(c.SMFIC_MAIL, args=["<a@sender.example>"])
        m.send_ar(c.SMFIC_RCPT, args=["<user@example.org>"])
        m._send(c.SMFIC_EOH)
        m._send(c.SMFIC_BODYEOB)
        seen = 0
        while True:
            reply = m._recv()
            if reply[0] == c.SMFIR_PROGRESS:
                seen += 1
            elif reply[0] == c.SMFIR_ACCEPT:
                return seen


async def test_slow_checks_send_progress_keepalives(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dns_server: DnsServer
) -> None:
    monkeypatch.setattr(connection, "PROGRESS_INTERVAL", 0.1)
    original = App.build_checks
    monkeypatch.setattr(App, "build_checks", lambda self: [*original(self), SlowContent()])
    data = proxy_config(
        None, {**QUIET, "dmarc": {"enabled": False}, "listen": None, "milter": {"listen": "127.0.0.1:0"}}
    )
    app = App(build_config(data, base_dir=tmp_path))
    await app.start()
    try:
        assert await run(count_progress, app.milter.port) >= 2  # type: ignore[union-attr]
    finally:
        await app.stop(grace=0.5)


def one_body(port: int, size: int) -> Any:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        m = MilterConnection(sock)
        m.optneg_mta(ACTIONS)
        m.send_ar(c.SMFIC_CONNECT, hostname="unknown", family="4", port=1, address="192.0.2.8")
        m.send_ar(c.SMFIC_MAIL, args=["<a@sender.example>"])
        m.send_ar(c.SMFIC_RCPT, args=["<user@example.org>"])
        m._send(c.SMFIC_HEADER, name="Subject", value=" budget")
        m._send(c.SMFIC_EOH)
        m._send(c.SMFIC_BODY, buf="x" * size)
        return m.send_eom()[-1]


async def test_past_the_inflight_budget_the_message_gets_452_and_the_bytes_come_back(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    data = proxy_config(None, {**QUIET, "listen": None, "milter": {"listen": "127.0.0.1:0"}})
    data["limits"] = {"max_inflight_bytes": 50_000}
    app = App(build_config(data, base_dir=tmp_path))
    await app.start()
    try:
        refused = await run(one_body, app.milter.port, 60_000)  # type: ignore[union-attr]
        assert app.inflight.used == 0
        accepted = await run(one_body, app.milter.port, 1_000)  # type: ignore[union-attr]
        assert app.inflight.used == 0
    finally:
        await app.stop(grace=0.5)
    assert refused[0] == c.SMFIR_REPLYCODE and refused[1]["smtpcode"] == "452"
    assert "4.3.1 Insufficient system storage" in str(refused[1]["text"])
    assert accepted[0] == c.SMFIR_ACCEPT
