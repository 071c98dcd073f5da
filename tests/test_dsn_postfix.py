"""DSN end to end: offered when the backend offers it, parameters passed on as written, Postfix notifies.

The proxy never writes a notification itself: Postfix does, to the envelope
sender (``other@example.org``, a mailbox of the fixture, so the report can be
read). One id links both logs: our transaction id is in our Received field and
our log line; Postfix's queue id from its 250 is in our log line too.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import pytest

from tests.backends import RecordingBackend
from tests.postfix import PostfixInstance, postfix_backend, postfix_instance
from tests.smtpclient import RawClient, dot_stuff, make_message

__all__ = ["postfix_backend", "postfix_instance"]  # fixtures used by name

SENDER = "other@example.org"
GOOD = "user@example.org"


async def _prime(proxy: Any) -> None:
    """One plain message: the backend's EHLO is known from then on (before it, DSN is not offered)."""
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.send_message(SENDER, [GOOD], make_message("prime"))).code == 250


def _transactions(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "smtpproxy.transaction"]  # type: ignore[attr-defined]


async def test_notify_success_reaches_postfix_which_reports_delivery_to_the_sender(
    postfix_backend: PostfixInstance, start_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="smtpproxy.transaction")
    pf = postfix_backend
    proxy = await start_proxy({}, backend_port=pf.port)
    await _prime(proxy)
    pf.wait_delivered(1)
    pf.clear_mailboxes()
    mark = pf.log_mark()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        ehlo = await c.cmd("EHLO client.test")
        assert "DSN" in ehlo.lines
        r = await c.cmd(f"MAIL FROM:<{SENDER}> RET=HDRS ENVID=Env+2BId.42")
        assert r.code == 250, r
        r = await c.cmd(f"RCPT TO:<{GOOD}> NOTIFY=SUCCESS,FAILURE ORCPT=rfc822;User+2Bx@Example.org")
        assert r.code == 250, r
        assert (await c.cmd("DATA")).code == 354
        final = await c.cmd(dot_stuff(make_message("dsn please")) + b".")
    assert final.code == 250, final
    queued = re.search(r"queued as ([0-9A-F]+)", final.text)
    assert queued is not None
    backend_id = queued.group(1)
    # Postfix's bounce daemon sent the "delivered" notification for this message.
    m = pf.wait_for_log(rf"{backend_id}: sender delivery status notification: ([0-9A-F]+)", since=mark)
    pf.wait_for_log(rf"{m.group(1)}: to=<{SENDER}>.*status=sent", since=mark)
    report = pf.wait_delivered(2)
    notice = next(d for d in report if d.mailbox == SENDER).content.decode()
    assert "multipart/report; report-type=delivery-status" in notice
    assert "Action: delivered" in notice
    # ENVID and ORCPT arrived as the client wrote them (xtext decoded by Postfix, case kept).
    assert "Original-Envelope-Id: Env+Id.42" in notice
    assert "Original-Recipient: rfc822;User+x@Example.org" in notice
    assert "text/rfc822-headers" in notice  # RET=HDRS: headers only
    # One id across the hop: ours in our Received field and our log line, Postfix's in our log line.
    delivered = next(d for d in report if d.mailbox == GOOD).content.decode()
    ours = re.search(r"by mx\.test\.example \(smtpproxy\) with ESMTP id ([0-9A-F]+)", delivered)
    assert ours is not None
    line = next(f for f in _transactions(caplog) if f["txn"] == ours.group(1))
    assert line["queue_id"] == backend_id and line["action"] == "delivered"
    # The DSN parameters are logged as the client wrote them (and as Postfix got them).
    assert line["mail_params"] == ["RET=HDRS", "ENVID=Env+2BId.42"] and line["mail_reply"] == "250 2.1.0"
    assert line["rcpts"] == [
        {
            "addr": GOOD,
            "reply": "250 2.1.5",
            "params": ["NOTIFY=SUCCESS,FAILURE", "ORCPT=rfc822;User+2Bx@Example.org"],
        }
    ]
    assert line["message_id"] is not None and line["message_id"] in delivered


async def test_bad_xtext_is_501_5_5_4_and_the_session_goes_on(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    pf = postfix_backend
    proxy = await start_proxy({}, backend_port=pf.port)
    await _prime(proxy)
    mark = pf.log_mark()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert "DSN" in (await c.cmd("EHLO client.test")).lines
        r = await c.cmd(f"MAIL FROM:<{SENDER}> ENVID=a+b")
        assert (r.code, r.lines[0][:5]) == (501, "5.5.4"), r
        assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        r = await c.cmd(f"RCPT TO:<{GOOD}> ORCPT=rfc822;bad=xtext@example.org")
        assert (r.code, r.lines[0][:5]) == (501, "5.5.4"), r
        r = await c.cmd(f"RCPT TO:<{GOOD}> RET=FULL")
        assert (r.code, r.lines[0][:5]) == (555, "5.5.4"), r
        assert (await c.cmd(f"RCPT TO:<{GOOD}> NOTIFY=never")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(dot_stuff(make_message("after bad xtext")) + b".")).code == 250
    # What we refused never reached Postfix.
    assert "bad=xtext" not in pf.maillog_since(mark)
    async with RawClient(proxy.host, proxy.port) as c:  # the next client is served
        await c.connect()
        assert (await c.send_message(SENDER, [GOOD], make_message("next"))).code == 250


async def test_backend_without_dsn_parameters_refused_with_the_reason(
    backend: RecordingBackend, start_proxy: Any
) -> None:
    proxy = await start_proxy()
    await _prime(proxy)
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        ehlo = await c.cmd("EHLO client.test")
        assert "DSN" not in ehlo.lines  # aiosmtpd offers none, so neither do we
        r = await c.cmd("MAIL FROM:<s@sender.example> RET=FULL")
        assert (r.code, r.lines[0][:5]) == (555, "5.5.4") and "offers no DSN" in r.text, r
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        r = await c.cmd(f"RCPT TO:<{GOOD}> NOTIFY=SUCCESS")
        assert (r.code, r.lines[0][:5]) == (555, "5.5.4") and "offers no DSN" in r.text, r
        assert (await c.cmd(f"RCPT TO:<{GOOD}>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(dot_stuff(make_message("without dsn")) + b".")).code == 250
    assert len(backend.messages) == 2
    assert not any("RET=" in " ".join(m.mail_options) for m in backend.messages)


async def test_dsn_not_offered_after_helo_or_before_the_backend_is_known(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    proxy = await start_proxy({}, backend_port=postfix_backend.port)
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert "DSN" not in (await c.cmd("EHLO client.test")).lines  # no backend EHLO seen yet
    await _prime(proxy)
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.cmd("HELO client.test")).code == 250
        r = await c.cmd(f"MAIL FROM:<{SENDER}> RET=FULL")
        assert r.code in (501, 555), r  # parameters need EHLO (and an offer)
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(f"MAIL FROM:<{SENDER}> RET=FULL")).code == 250


async def test_offered_dsn_then_a_backend_connection_without_it_is_a_4xx_and_the_next_ehlo_tells(
    start_proxy: Any,
) -> None:
    backend = RecordingBackend(extra_extensions=("DSN",))
    await backend.start()
    try:
        proxy = await start_proxy({}, backend_port=backend.port)
        await _prime(proxy)
        async with RawClient(proxy.host, proxy.port) as a, RawClient(proxy.host, proxy.port) as b:
            await a.connect()
            await b.connect()
            assert "DSN" in (await a.cmd("EHLO a.test")).lines
            backend.extra_extensions = ()  # the backend is reconfigured without DSN
            assert (await b.cmd("EHLO b.test")).code == 250
            assert (await b.cmd("MAIL FROM:<s@sender.example>")).code == 250  # holds the pooled connection
            r = await a.cmd("MAIL FROM:<s@sender.example> RET=FULL")  # a new connection, no DSN
            assert (r.code, r.lines[0][:5]) == (451, "4.3.0") and "DSN" in r.text, r
            assert (await a.cmd("MAIL FROM:<s@sender.example>")).code == 250
            r = await a.cmd(f"RCPT TO:<{GOOD}> NOTIFY=SUCCESS")
            assert (r.code, r.lines[0][:5]) == (451, "4.3.0") and "DSN" in r.text, r
            assert (await a.cmd(f"RCPT TO:<{GOOD}>")).code == 250
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            assert "DSN" not in (await c.cmd("EHLO c.test")).lines
    finally:
        await backend.stop()
