"""The proxy core through real sockets: mirroring, limits, headers, bad input."""

from __future__ import annotations

import asyncio

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message


async def _client(proxy: object) -> RawClient:
    c = RawClient(proxy.host, proxy.port)  # type: ignore[attr-defined]
    banner = await c.connect()
    assert banner.code == 220
    return c


async def test_clean_delivery_body_byte_identical_with_one_received(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    body = make_message(
        body="Line one\r\n..leading dot\r\n\xe9t\xe9 8-bit\r\n".encode("latin-1").decode("latin-1")
    )
    async with await _client(proxy) as c:
        r = await c.send_message("sender@sender.example", ["user@example.org"], body)
        assert r.code == 250, r
        assert (await c.cmd("QUIT")).code == 221
    assert len(backend.messages) == 1
    got = backend.messages[0].content
    assert got.startswith(b"Received: from client.test (unknown [127.0.0.1])\r\n\tby mx.test.example")
    assert got.count(b"Received:") == 1
    assert got.endswith(body), "message after our header must be byte-identical"


async def test_backend_reply_text_is_mirrored_to_the_client(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
    assert r.code == 250 and "queued as Q1" in r.text


async def test_backend_550_for_one_recipient_is_mirrored_other_delivered(
    backend: RecordingBackend, start_proxy
) -> None:
    backend.rcpt_replies["nobody@example.org"] = "550 5.1.1 User unknown"
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        r = await c.cmd("RCPT TO:<nobody@example.org>")
        assert (r.code, r.text) == (550, "5.1.1 User unknown")
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
        assert (await c.cmd("DATA")).code == 354
        assert (await c.cmd(make_message() + b".")).code == 250
    assert backend.messages[0].rcpts == ["user@example.org"]


async def test_backend_4xx_and_5xx_at_mail_are_mirrored(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    for reply in ("451 4.3.2 Try later", "553 5.1.8 Bad sender domain"):
        backend.mail_reply = reply
        async with await _client(proxy) as c:
            await c.cmd("EHLO client.test")
            r = await c.cmd("MAIL FROM:<s@sender.example>")
            assert f"{r.code} {r.text}" == reply
            # The transaction did not start: RCPT needs MAIL.
            assert (await c.cmd("RCPT TO:<user@example.org>")).code == 503
    assert backend.messages == []


async def test_backend_4xx_and_5xx_at_end_of_data_are_mirrored(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    for reply in ("452 4.3.1 Insufficient storage", "554 5.6.0 Content refused"):
        backend.data_reply = reply
        async with await _client(proxy) as c:
            r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
            assert f"{r.code} {r.text}" == reply
    assert backend.messages == []


async def test_backend_down_gives_451_and_nothing_delivered(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    await backend.stop()
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        r = await c.cmd("MAIL FROM:<s@sender.example>")
        assert r.code == 451 and r.text.startswith("4.4.1")
        # The session goes on: the client may retry later in the same connection.
        assert (await c.cmd("NOOP")).code == 250


async def test_backend_slow_past_timeout_gives_4xx(backend: RecordingBackend, start_proxy) -> None:
    backend.data_delay = 3.0
    proxy = await start_proxy({"backend_options": {"data_timeout": 0.5}})
    async with await _client(proxy) as c:
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
    assert r.code == 451 and r.text.startswith("4.4.2"), r


async def test_backend_dropping_mid_data_gives_4xx(backend: RecordingBackend, start_proxy) -> None:
    backend.drop_at = "data"
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
    assert r.code == 451, r
    assert backend.messages == []


async def test_backend_dropping_at_rcpt_gives_4xx(backend: RecordingBackend, start_proxy) -> None:
    backend.drop_at = "rcpt"
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        r = await c.cmd("RCPT TO:<user@example.org>")
        assert r.code == 451
        assert (await c.cmd("DATA")).code == 503


async def test_non_relay_recipient_550_never_reaches_backend(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<s@sender.example>")
        r = await c.cmd("RCPT TO:<victim@elsewhere.example>")
        assert r.code == 550 and r.text.startswith("5.7.1")
    assert not any(cmd.startswith("RCPT") for cmd in backend.commands)


async def test_empty_relay_domains_relays_nothing(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"relay_domains": []})
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<s@sender.example>")
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 550
        assert (await c.cmd("RCPT TO:<user@[127.0.0.1]>")).code == 550


async def test_oversized_message_552_534(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"limits": {"max_message_size": 2000}})
    async with await _client(proxy) as c:
        ehlo = await c.cmd("EHLO client.test")
        assert "SIZE 2000" in ehlo.lines
        r = await c.cmd("MAIL FROM:<s@sender.example> SIZE=5000")
        assert r.code == 552 and r.text.startswith("5.3.4")
        r = await c.send_message(
            "s@sender.example", ["user@example.org"], make_message(body="x" * 70 + "\r\n") * 40
        )
        assert r.code == 552 and r.text.startswith("5.3.4"), r
        # Still serving.
        assert (await c.cmd("NOOP")).code == 250
    assert backend.messages == []


async def test_too_many_recipients_452_453(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"limits": {"max_recipients": 2}})
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<s@sender.example>")
        assert (await c.cmd("RCPT TO:<a@example.org>")).code == 250
        assert (await c.cmd("RCPT TO:<b@example.org>")).code == 250
        r = await c.cmd("RCPT TO:<c@example.org>")
        assert r.code == 452 and r.text.startswith("4.5.3")


async def test_messages_per_connection_limit_421_and_close(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"limits": {"max_messages_per_connection": 2}})
    async with await _client(proxy) as c:
        for _ in range(2):
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message())
            ).code == 250
        r = await c.cmd("MAIL FROM:<s@sender.example>")
        assert r.code == 421 and r.text.startswith("4.7.0")
        assert await c.closed()
    assert len(backend.messages) == 2


async def test_idle_timeout_421_442(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"limits": {"idle_timeout": 0.3}})
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        r = await c.reply()
        assert r.code == 421 and r.text.startswith("4.4.2")
        assert await c.closed()


async def test_pipelined_commands_get_replies_in_order(backend: RecordingBackend, start_proxy) -> None:
    backend.rcpt_replies["gone@example.org"] = "550 5.1.1 No such user"
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        ehlo = await c.cmd("EHLO client.test")
        assert "PIPELINING" in ehlo.lines and "ENHANCEDSTATUSCODES" in ehlo.lines
        await c.send(
            b"MAIL FROM:<s@sender.example>\r\nRCPT TO:<user@example.org>\r\nRCPT TO:<gone@example.org>\r\n"
            b"RCPT TO:<x@other.example>\r\nDATA\r\n"
        )
        codes = [(await c.reply()).code for _ in range(5)]
        assert codes == [250, 250, 550, 550, 354]
        assert (await c.cmd(make_message() + b".")).code == 250
    assert backend.messages[0].rcpts == ["user@example.org"]


async def test_smtputf8_and_8bit_bodies_are_preserved(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    body = "From: Jörg <jörg@sender.example>\r\nSubject: Grüße\r\n\r\nÄpfel und Birnen\r\n".encode()
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<jörg@sender.example> SMTPUTF8 BODY=8BITMIME")).code == 250
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
        await c.cmd("DATA")
        assert (await c.cmd(body + b".")).code == 250
    msg = backend.messages[0]
    assert msg.mail_from == "jörg@sender.example"
    assert "SMTPUTF8" in msg.mail_options and "BODY=8BITMIME" in msg.mail_options
    assert msg.content.endswith(body)


async def test_null_sender_is_relayed(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        r = await c.send_message("", ["user@example.org"], make_message())
        assert r.code == 250
    assert backend.messages[0].mail_from == "<>"  # aiosmtpd spells the null sender so


async def test_rset_and_second_transaction_reuse_backend_connection(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<s@sender.example>")
        assert (await c.cmd("RSET")).code == 250
        for _ in range(3):
            r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
            assert r.code == 250
    assert "RSET" in backend.commands
    assert len(backend.ehlo_sessions) == 1, "the backend session is pooled and reused"


async def test_bad_input_gets_errors_and_next_client_is_served(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        r = await c.cmd(b"\x00\xff\xfe garbage")
        assert r.code == 500
        r = await c.cmd(b"X" * 10_000)
        assert r.code == 500 and r.text.startswith("5.5.2")
        r = await c.cmd(b"MAIL FROM:<a@b\x00c>")
        assert r.code in (500, 501, 503, 553)
        await c.cmd("EHLO client.test")
        assert (await c.cmd("DATA")).code == 503
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 503
    async with await _client(proxy) as c:
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250


async def test_client_vanishing_mid_data_delivers_nothing(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    c = await _client(proxy)
    await c.cmd("EHLO client.test")
    await c.cmd("MAIL FROM:<s@sender.example>")
    await c.cmd("RCPT TO:<user@example.org>")
    await c.cmd("DATA")
    await c.send(b"Subject: half\r\n\r\npart of a body\r\n")
    await c.close()
    await asyncio.sleep(0.2)
    assert backend.messages == []
    async with await _client(proxy) as c2:
        assert (await c2.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    assert len(backend.messages) == 1


async def test_500_recipients_each_answered_and_limit_holds(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        await c.cmd("EHLO client.test")
        await c.cmd("MAIL FROM:<s@sender.example>")
        await c.send(b"".join(f"RCPT TO:<u{i}@example.org>\r\n".encode() for i in range(500)))
        codes = [(await c.reply()).code for _ in range(500)]
        assert codes.count(250) == 100 and codes.count(452) == 400
        await c.cmd("DATA")
        assert (await c.cmd(make_message() + b".")).code == 250
    assert len(backend.messages[0].rcpts) == 100


async def test_auth_is_not_offered_or_accepted(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with await _client(proxy) as c:
        ehlo = await c.cmd("EHLO client.test")
        assert not any(line.startswith("AUTH") for line in ehlo.lines)
        assert (await c.cmd("AUTH PLAIN AGFhAGI=")).code == 502


async def test_client_vanishing_while_backend_takes_data_is_logged_not_cut(
    backend: RecordingBackend, start_proxy, caplog
) -> None:
    backend.data_delay = 0.5
    proxy = await start_proxy()
    c = await _client(proxy)
    await c.cmd("EHLO client.test")
    await c.cmd("MAIL FROM:<s@sender.example>")
    await c.cmd("RCPT TO:<user@example.org>")
    await c.cmd("DATA")
    with caplog.at_level("INFO", logger="smtpproxy.transaction"):
        await c.send(make_message() + b".\r\n")
        await asyncio.sleep(0.1)
        await c.close()
        await asyncio.sleep(1.0)
    # The backend got the whole message (the SMTP duplicate case, not a loss) and we logged it.
    assert len(backend.messages) == 1
    lines = [
        r for r in caplog.records if getattr(r, "fields", {}).get("reason") == "client_lost_before_reply"
    ]
    assert lines and lines[0].fields["action"] == "delivered"  # type: ignore[attr-defined]


async def test_shutdown_tells_idle_clients_421_and_lets_a_transaction_finish(
    backend: RecordingBackend, start_proxy
) -> None:
    """SIGTERM's drain: idle connections hear 421 4.3.2 at once; one mid-transaction may deliver first."""
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as idle, RawClient(proxy.host, proxy.port) as busy:
        await idle.connect()
        await idle.cmd("EHLO idle.test")
        await busy.connect()
        await busy.cmd("EHLO busy.test")
        assert (await busy.cmd("MAIL FROM:<s@sender.example>")).code == 250
        assert (await busy.cmd("RCPT TO:<user@example.org>")).code == 250
        stopping = asyncio.ensure_future(proxy.app.stop(grace=5))
        goodbye = await idle.reply()
        assert (goodbye.code, goodbye.text[:5]) == (421, "4.3.2"), goodbye
        assert (await busy.cmd("DATA")).code == 354
        assert (await busy.cmd(make_message() + b".")).code == 250
        await stopping
    assert len(backend.messages) == 1
