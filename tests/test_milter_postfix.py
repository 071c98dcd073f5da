"""Milter mode end to end: a real Postfix with our milter in ``smtpd_milters``, a real client in front.

Postfix is the backend: what it accepts it delivers to its own virtual maildirs;
what our policy refuses, Postfix refuses with our reply.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.app import App
from smtpproxy.config import build_config
from tests.conftest import proxy_config
from tests.dnsserver import DnsServer
from tests.postfix import PostfixInstance, free_port, postfix_available
from tests.smtpclient import RawClient, make_message

SHIPPED = Path(__file__).resolve().parent.parent / "smtpproxy" / "data" / "rules"
ZONE: dict[str, Any] = {
    "sender.example": [("TXT", "v=spf1 ip4:127.0.0.0/8 -all")],
    "_dmarc.sender.example": [("TXT", "v=DMARC1; p=none")],
    "strict.example": [("TXT", "v=spf1 ip4:192.0.2.1 -all")],
    "_dmarc.strict.example": [("TXT", "v=DMARC1; p=reject")],
}
TEST_RULES = """\
- name: later_please
  if: {subject: {contains: tempfail me}}
  then: {tempfail: {code: 451, enhanced: "4.7.1", text: "Deferred by rule later_please"}}
- name: hold_it
  if: {subject: {contains: quarantine me}}
  then: quarantine
"""
EXE = (
    "MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=b1\r\n",
    "--b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n"
    "--b1\r\nContent-Type: application/octet-stream\r\n"
    'Content-Disposition: attachment; filename="invoice.pdf.exe"\r\n'
    "Content-Transfer-Encoding: base64\r\n\r\nTVqQAAMAAAAEAAAA\r\n--b1--\r\n",
)


@pytest.fixture(scope="module")
def milter_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def postfix(milter_port: int) -> Iterator[PostfixInstance]:
    if not postfix_available():
        pytest.skip("postfix is not installed (CI installs the postfix package)")
    pf = PostfixInstance()
    pf.configure(
        smtpd_milters=f"inet:127.0.0.1:{milter_port}",
        milter_protocol="6",
        milter_default_action="tempfail",
        # Keep what is put on hold where postqueue shows it.
        queue_run_delay="300s",
    )
    try:
        pf.start()
        yield pf
    finally:
        pf.cleanup()


@pytest.fixture
async def milter(
    tmp_path: Path, milter_port: int, postfix: PostfixInstance
) -> AsyncIterator[tuple[App, PostfixInstance]]:
    rules = tmp_path / "rules"
    shutil.copytree(SHIPPED, rules)
    (rules / "90-test.yaml").write_text(TEST_RULES)
    with DnsServer(dict(ZONE)) as dns:
        data = proxy_config(
            None,
            {
                "listen": None,
                "milter": {"listen": f"127.0.0.1:{milter_port}"},
                "rules": "rules",
                "hostname": "mx.test.example",
                "ratelimits": [
                    {"name": "rcpt_per_sender", "key": "sender", "rate": "60/hour", "burst": 2, "on": "rcpt"}
                ],
            },
        )
        data["dns"]["nameservers"] = [dns.address]
        app = App(build_config(data, base_dir=tmp_path))
        await app.start()
        postfix.clear_mailboxes()
        try:
            yield app, postfix
        finally:
            await app.stop(grace=0.5)


async def send(pf: PostfixInstance, sender: str, body: bytes, rcpts: list[str] | None = None) -> Any:
    async with RawClient("127.0.0.1", pf.port) as c:
        assert (await c.connect()).code == 220
        return await c.send_message(sender, rcpts or ["user@example.org"], body)


async def test_clean_message_is_delivered_with_our_authentication_results(milter: Any) -> None:
    _, pf = milter
    forged = "Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=forged\r\n"
    body = make_message("hello", extra=forged)
    reply = await send(pf, "a@sender.example", body)
    assert reply.code == 250, reply
    [msg] = await asyncio.to_thread(pf.wait_delivered, 1)
    header = msg.content.split(b"\n\n")[0].decode()
    ours = [line for line in header.split("\n") if line.startswith("Authentication-Results: mx.test.example")]
    assert len(ours) == 1 and "spf=pass" in ours[0], header
    assert "smtp.mailfrom=forged" not in header
    # Ours is above Postfix's own Received (only the delivery agent's fields are above it).
    first_fields = [h.split(":")[0] for h in header.split("\n") if h and not h[0].isspace()]
    assert first_fields.index("Authentication-Results") < first_fields.index("Received")


async def test_executable_attachment_gets_our_554_text_from_postfix(milter: Any) -> None:
    _, pf = milter
    reply = await send(pf, "a@sender.example", make_message("invoice", body=EXE[1], extra=EXE[0]))
    assert (reply.code, reply.text) == (554, "5.7.1 Executable attachments are not accepted"), reply


async def test_dmarc_reject_is_refused_with_our_code(milter: Any) -> None:
    _, pf = milter
    body = make_message("hi").replace(b"sender@sender.example", b"boss@strict.example")
    reply = await send(pf, "boss@strict.example", body)
    assert reply.code == 550 and reply.text.startswith("5.7."), reply


async def test_tempfail_rule_gives_4xx(milter: Any) -> None:
    _, pf = milter
    reply = await send(pf, "a@sender.example", make_message("please tempfail me"))
    assert (reply.code, reply.text) == (451, "4.7.1 Deferred by rule later_please"), reply


async def test_quarantine_rule_puts_the_message_on_hold(milter: Any) -> None:
    _, pf = milter
    reply = await send(pf, "a@sender.example", make_message("quarantine me"))
    assert reply.code == 250, reply
    listed = await asyncio.to_thread(
        subprocess.run,
        ["postqueue", "-c", str(pf.conf), "-j"],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    )
    queued = [json.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert [q["queue_name"] for q in queued] == ["hold"], listed.stdout
    await asyncio.to_thread(subprocess.run, ["postsuper", "-c", str(pf.conf), "-d", "ALL"], check=True)


async def test_rate_limit_hits_at_rcpt(milter: Any) -> None:
    _, pf = milter
    async with RawClient("127.0.0.1", pf.port) as c:
        assert (await c.connect()).code == 220
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<flood@sender.example>")).code == 250
        codes = [(await c.cmd(f"RCPT TO:<{u}@example.org>")) for u in ("user", "other", "third")]
    assert [r.code for r in codes] == [250, 250, 450], codes
    assert codes[2].text.startswith("4.7.1"), codes[2]


async def test_bad_input_to_postfix_then_the_next_client_is_served(milter: Any) -> None:
    _, pf = milter
    async with RawClient("127.0.0.1", pf.port) as c:
        assert (await c.connect()).code == 220
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<bad\x01@sender.example>")).code >= 500
    assert (await send(pf, "a@sender.example", make_message("next"))).code == 250


async def test_milter_killed_mid_session_postfix_applies_default_action(milter: Any) -> None:
    app, pf = milter
    async with RawClient("127.0.0.1", pf.port) as c:
        assert (await c.connect()).code == 220
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd("MAIL FROM:<a@sender.example>")).code == 250
        for conn in list(app.milter.connections):
            conn.writer.transport.abort()  # as a killed process would: no goodbye
        await asyncio.sleep(0.2)
        reply = await c.cmd("RCPT TO:<user@example.org>")
    assert reply.code == 451 and reply.text.startswith("4."), reply
