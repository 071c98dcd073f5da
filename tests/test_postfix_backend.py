"""The proxy in front of a real Postfix: the right client, its HELO, its recipients, restarts and reloads.

Clients connect from 127.0.0.2 and 127.0.0.3 (all of 127/8 is local on
Linux); the proxy connects to Postfix from 127.0.0.1, the one address Postfix
lets send XCLIENT/XFORWARD.
"""

from __future__ import annotations

import asyncio
import re
import smtplib
from typing import Any

import pytest

from tests.postfix import PostfixInstance, postfix_backend, postfix_instance
from tests.smtpclient import RawClient, SmtpReply, make_message

__all__ = ["postfix_backend", "postfix_instance"]  # fixtures used by name

SENDER = "s@sender.example"
GOOD = "user@example.org"


class ClientFrom(RawClient):
    """A raw SMTP client whose connection comes from a chosen loopback address."""

    def __init__(self, host: str, port: int, source: str) -> None:
        super().__init__(host, port)
        self.source = source

    async def connect(self) -> SmtpReply:
        self.reader, self.writer = await asyncio.open_connection(
            self.host, self.port, local_addr=(self.source, 0), limit=1 << 20
        )
        return await self.reply()


async def _proxy(start_proxy: Any, pf: PostfixInstance, **backend_options: Any) -> Any:
    return await start_proxy({"backend_options": backend_options}, backend_port=pf.port)


async def _send(
    proxy: Any, source: str, helo: str = "client.test", rcpts: list[str] | None = None
) -> SmtpReply:
    async with ClientFrom(proxy.host, proxy.port, source) as c:
        await c.connect()
        return await c.send_message(SENDER, rcpts or [GOOD], make_message(f"from {source}"), helo=helo)


def _queued(reply: SmtpReply) -> str:
    """Postfix's queue id from its 250 reply to the end of DATA."""
    assert reply.code == 250, reply
    m = re.search(r"queued as ([0-9A-F]+)", reply.text)
    assert m is not None, reply
    return m.group(1)


async def _reload(pf: PostfixInstance, **settings: str) -> None:
    pf.configure(**settings)
    await asyncio.to_thread(pf.reload)


# -- XCLIENT: every message under its own client -------------------------------------


@pytest.mark.parametrize("order", [("127.0.0.2", "127.0.0.3"), ("127.0.0.3", "127.0.0.2")])
async def test_xclient_each_session_reaches_postfix_as_its_own_client(
    postfix_backend: PostfixInstance, start_proxy: Any, order: tuple[str, str]
) -> None:
    pf = postfix_backend
    await _reload(pf, smtpd_client_restrictions="check_client_access inline:{127.0.0.3=REJECT}")
    proxy = await _proxy(start_proxy, pf, forward_client="xclient")
    mark = pf.log_mark()
    queue_ids: dict[str, str] = {}
    for round_ in range(2):
        for source in order:
            async with ClientFrom(proxy.host, proxy.port, source) as c:
                await c.connect()
                # Several transactions per session: each one under this client.
                for n in range(2):
                    r = await c.send_message(SENDER, [GOOD], make_message(f"{source} {round_} {n}"))
                    if source == "127.0.0.3":
                        assert r.code == 554 and "Client host rejected" in r.text, r
                    else:
                        queue_ids[f"{round_}{n}"] = _queued(r)
    assert len(queue_ids) == 4
    for qid in queue_ids.values():
        pf.wait_for_log(rf"{qid}: client=unknown\[127\.0\.0\.2\]", since=mark)
    log = pf.maillog_since(mark)
    assert re.search(r"reject: RCPT from unknown\[127\.0\.0\.3\]: 554 5\.7\.1", log)
    assert not re.search(r"reject: RCPT from \S+\[127\.0\.0\.2\]", log)
    assert "client=localhost[127.0.0.1]" not in log  # nothing under the proxy's identity
    delivered = pf.wait_delivered(4)
    assert all(b"(unknown [127.0.0.2])" in d.content for d in delivered)
    # No backend connection that carried a client is left for the next one.
    assert len(proxy.app.backend._idle) == 0


async def test_xclient_concurrent_clients_are_not_mixed_up(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    pf = postfix_backend
    await _reload(pf, smtpd_client_restrictions="check_client_access inline:{127.0.0.3=REJECT}")
    proxy = await _proxy(start_proxy, pf, forward_client="xclient")
    sources = ["127.0.0.2", "127.0.0.3"] * 4
    replies = await asyncio.gather(*(_send(proxy, s) for s in sources))
    for source, reply in zip(sources, replies, strict=True):
        assert (reply.code == 250) == (source == "127.0.0.2"), (source, reply)
    assert len(pf.wait_delivered(4)) == 4


async def test_xclient_client_helo_is_what_postfix_judges_and_logs(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    pf = postfix_backend
    await _reload(
        pf,
        smtpd_helo_required="yes",
        smtpd_helo_restrictions="check_helo_access inline:{bad.helo.example=REJECT, good.helo.example=OK}",
        smtpd_log_access_permit_actions="static:all",
    )
    proxy = await _proxy(start_proxy, pf, forward_client="xclient")
    mark = pf.log_mark()
    bad = await _send(proxy, "127.0.0.2", helo="bad.helo.example")
    assert bad.code == 554 and "<bad.helo.example>: Helo command rejected" in bad.text, bad
    qid = _queued(await _send(proxy, "127.0.0.3", helo="good.helo.example"))
    pf.wait_for_log(rf"{qid}: client=unknown\[127\.0\.0\.3\]", since=mark)
    log = pf.maillog_since(mark)
    assert re.search(r"reject: RCPT from unknown\[127\.0\.0\.2\]: .* helo=<bad\.helo\.example>", log)
    assert re.search(r"permit: RCPT from unknown\[127\.0\.0\.3\]: .* helo=<good\.helo\.example>", log)
    assert "helo=<mx.test.example>" not in log  # the proxy's own name is never judged
    [message] = pf.wait_delivered(1)
    assert b"Received: from good.helo.example (unknown [127.0.0.3])" in message.content


async def test_xclient_helo_refused_at_ehlo_is_mirrored_at_mail(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    pf = postfix_backend
    # smtpd_delay_reject = no: Postfix refuses the HELO at the EHLO after XCLIENT.
    await _reload(
        pf,
        smtpd_delay_reject="no",
        smtpd_helo_required="yes",
        smtpd_helo_restrictions="check_helo_access inline:{bad.helo.example=REJECT}",
    )
    proxy = await _proxy(start_proxy, pf, forward_client="xclient")
    async with ClientFrom(proxy.host, proxy.port, "127.0.0.2") as c:
        await c.connect()
        assert (await c.cmd("EHLO bad.helo.example")).code == 250
        r = await c.cmd(f"MAIL FROM:<{SENDER}>")
        assert r.code == 554 and "Helo command rejected" in r.text, r
        assert (await c.cmd("RSET")).code == 250
    _queued(await _send(proxy, "127.0.0.2", helo="good.helo.example"))
    assert len(pf.wait_delivered(1)) == 1


# -- XFORWARD: per transaction, on shared pooled connections ------------------------------


async def test_xforward_pooled_connection_names_each_client(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    pf = postfix_backend
    proxy = await _proxy(start_proxy, pf, forward_client="xforward")
    mark = pf.log_mark()
    first = _queued(await _send(proxy, "127.0.0.2", helo="first.example"))
    second = _queued(await _send(proxy, "127.0.0.3", helo="second.example"))
    # Both went over one pooled connection, which is allowed for XFORWARD (see backend.forward).
    [conn] = proxy.app.backend._idle
    assert conn.transactions == 2
    for qid, source in ((first, "127.0.0.2"), (second, "127.0.0.3")):
        # The smtpd line shows the real connection, the forwarded client follows it.
        pf.wait_for_log(
            rf"{qid}: client=localhost\[127\.0\.0\.1\], orig_client=unknown\[{source}\]", since=mark
        )
    delivered = pf.wait_delivered(2)
    contents = b"\n".join(d.content for d in delivered)
    assert b"from first.example (unknown [127.0.0.2])" in contents
    assert b"from second.example (unknown [127.0.0.3])" in contents
    assert b"from first.example (unknown [127.0.0.3])" not in contents


# -- mirrored recipients ---------------------------------------------------------------------


async def test_unknown_recipient_gets_postfix_own_550_and_good_one_is_delivered(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    pf = postfix_backend
    proxy = await _proxy(start_proxy, pf, forward_client="xclient")
    async with ClientFrom(proxy.host, proxy.port, "127.0.0.2") as c:
        await c.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        unknown = await c.cmd("RCPT TO:<nobody@example.org>")
        assert unknown.code == 550 and unknown.text.startswith("5.1.1 <nobody@example.org>"), unknown
        assert "User unknown" in unknown.text
        assert (await c.cmd(f"RCPT TO:<{GOOD}>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        _queued(await c.cmd(make_message("mixed") + b"."))
    [message] = pf.wait_delivered(1)
    assert message.mailbox == GOOD


# -- Postfix goes away and comes back ---------------------------------------------------------


@pytest.mark.parametrize("when", ["after_rcpt", "during_data"])
async def test_postfix_stopped_mid_session_gives_4xx_and_next_client_is_served(
    postfix_backend: PostfixInstance, start_proxy: Any, when: str
) -> None:
    pf = postfix_backend
    proxy = await _proxy(start_proxy, pf)
    async with ClientFrom(proxy.host, proxy.port, "127.0.0.2") as c:
        await c.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        assert (await c.cmd(f"MAIL FROM:<{SENDER}>")).code == 250
        assert (await c.cmd(f"RCPT TO:<{GOOD}>")).code == 250
        if when == "after_rcpt":
            await asyncio.to_thread(pf.stop)
        assert (await c.cmd("DATA")).code == 354
        await c.send(make_message("cut off")[:40])
        if when == "during_data":
            await asyncio.to_thread(pf.stop)
        final = await c.cmd(make_message("cut off")[40:] + b".")
        assert 400 <= final.code < 500, final  # never 250: the sender keeps the message
        # The session goes on: the next transaction is tried afresh (refused while Postfix is down).
        r = await c.cmd(f"MAIL FROM:<{SENDER}>")
        assert r.code == 451 and r.text.startswith("4.4.1"), r
    assert pf.delivered() == []
    await asyncio.to_thread(pf.start)
    _queued(await _send(proxy, "127.0.0.3"))
    assert len(pf.wait_delivered(1)) == 1


async def test_reload_reaches_pooled_connections_within_idle_timeout(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    pf = postfix_backend
    proxy = await start_proxy(
        {"backend_options": {"pool_idle_timeout": 2.0}, "relay_domains": ["example.org"]},
        backend_port=pf.port,
    )
    other = "other@example.org"
    _queued(await _send(proxy, "127.0.0.2", rcpts=[other]))
    assert len(proxy.app.backend._idle) == 1
    await _reload(pf, smtpd_recipient_restrictions=f"check_recipient_access inline:{{{other}=REJECT}}")
    await asyncio.sleep(2.5)  # past pool_idle_timeout: the old smtpd's connection is not reused
    r = await _send(proxy, "127.0.0.2", rcpts=[other])
    assert r.code == 554 and "Recipient address rejected: Access denied" in r.text, r
    _queued(await _send(proxy, "127.0.0.2"))


# -- TLS to Postfix -------------------------------------------------------------------------


async def test_require_tls_refuses_postfix_without_tls(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    pf = postfix_backend
    proxy = await _proxy(start_proxy, pf, require_tls=True)
    mark = pf.log_mark()
    async with ClientFrom(proxy.host, proxy.port, "127.0.0.2") as c:
        await c.connect()
        assert (await c.cmd("EHLO client.test")).code == 250
        r = await c.cmd(f"MAIL FROM:<{SENDER}>")
        assert r.code == 451 and r.text.startswith("4.3.0"), r
    assert proxy.app.metrics.backend_errors.labels("tls_required")._value.get() >= 1
    await asyncio.sleep(0.5)
    assert "MAIL" not in pf.maillog_since(mark)
    assert not re.search(r"[0-9A-F]+: client=", pf.maillog_since(mark))
    assert pf.delivered() == []


# -- the fixture itself ---------------------------------------------------------------------


async def test_two_postfix_instances_run_side_by_side(
    postfix_backend: PostfixInstance, start_proxy: Any
) -> None:
    second = PostfixInstance()
    try:
        await asyncio.to_thread(second.start)
        assert second.port != postfix_backend.port and second.root != postfix_backend.root
        for pf in (postfix_backend, second):
            proxy = await _proxy(start_proxy, pf)
            _queued(await _send(proxy, "127.0.0.2"))
            assert len(pf.wait_delivered(1)) == 1
        assert "daemon started" in second.maillog()
    finally:
        await asyncio.to_thread(second.cleanup)
    assert postfix_backend.running and not second.root.exists()


def _direct_relay_attempt(pf: PostfixInstance, xclient_addr: str | None) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", pf.port, timeout=10) as s:
        s.ehlo("direct.test")
        if xclient_addr is not None:
            assert s.docmd("XCLIENT", f"ADDR={xclient_addr}")[0] == 220
            s.ehlo("direct.test")
        assert s.mail(SENDER)[0] == 250
        return s.rcpt("x@elsewhere.example")


async def test_fixture_relays_nothing_and_the_log_shows_what_would_have_been(
    postfix_backend: PostfixInstance,
) -> None:
    pf = postfix_backend
    mark = pf.log_mark()
    # Trusted (mynetworks): Postfix would relay; the error transport refuses it with our text.
    code, text = await asyncio.to_thread(_direct_relay_attempt, pf, None)
    assert code == 550 and b"relaying disabled" in text
    # Untrusted: an ordinary relay refusal.
    code, text = await asyncio.to_thread(_direct_relay_attempt, pf, "192.0.2.1")
    assert code == 454 and b"Relay access denied" in text  # defer_unauth_destination
    pf.wait_for_log(r"RCPT from localhost\[127\.0\.0\.1\]: 550 5\.7\.1 .*relaying disabled", since=mark)
    assert pf.delivered() == []
