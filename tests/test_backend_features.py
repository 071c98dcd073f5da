"""Backend extensions: XCLIENT / XFORWARD pass the real client on; missing 8BITMIME/SMTPUTF8 refuse."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from smtpproxy.backend.wire import wire_content
from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message


async def _backend(**kwargs: object) -> RecordingBackend:
    b = RecordingBackend(**kwargs)  # type: ignore[arg-type]
    await b.start()
    return b


async def test_xforward_sent_before_mail_when_enabled_and_offered(start_proxy) -> None:
    b = await _backend(extra_extensions=("XFORWARD NAME ADDR PROTO HELO",))
    try:
        proxy = await start_proxy({"backend_options": {"forward_client": "xforward"}}, backend_port=b.port)
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message(), helo="h+x=y")
            ).code == 250
        assert b.forwarded == ["XFORWARD ADDR=127.0.0.1 PROTO=ESMTP NAME=[UNAVAILABLE] HELO=h+2Bx+3Dy"]
        assert len(b.messages) == 1
    finally:
        await b.stop()


async def test_xclient_sent_per_transaction_when_enabled_and_offered(start_proxy) -> None:
    b = await _backend(extra_extensions=("XCLIENT NAME ADDR PROTO HELO",))
    try:
        proxy = await start_proxy({"backend_options": {"forward_client": "xclient"}}, backend_port=b.port)
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            for _ in range(2):
                assert (
                    await c.send_message("s@sender.example", ["user@example.org"], make_message())
                ).code == 250
        assert b.forwarded == ["XCLIENT ADDR=127.0.0.1 PROTO=ESMTP NAME=[UNAVAILABLE] HELO=client.test"] * 2
        assert len(b.messages) == 2
    finally:
        await b.stop()


async def test_no_client_forwarding_unless_configured(start_proxy) -> None:
    b = await _backend(extra_extensions=("XCLIENT NAME ADDR", "XFORWARD NAME ADDR"))
    try:
        proxy = await start_proxy(backend_port=b.port)
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message())
            ).code == 250
        assert b.forwarded == []
    finally:
        await b.stop()


async def test_clients_cannot_send_xclient_or_xforward_to_us(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        ehlo = await c.cmd("EHLO client.test")
        assert not any(line.startswith(("XCLIENT", "XFORWARD")) for line in ehlo.lines)
        assert (await c.cmd("XCLIENT ADDR=10.0.0.1")).code == 500
        assert (await c.cmd("XFORWARD ADDR=10.0.0.1")).code == 500
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    assert b"[127.0.0.1]" in backend.messages[0].content.split(b"\r\n")[0]


async def test_8bit_message_refused_when_backend_lacks_8bitmime(start_proxy) -> None:
    b = await _backend(eight_bit=False)
    try:
        proxy = await start_proxy(backend_port=b.port)
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            await c.cmd("EHLO client.test")
            r = await c.cmd("MAIL FROM:<s@sender.example> BODY=8BITMIME")
            assert r.code == 554 and r.text.startswith("5.6.3")
            # 7-bit mail still flows.
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message())
            ).code == 250
        assert len(b.messages) == 1
    finally:
        await b.stop()


async def test_smtputf8_message_refused_when_backend_lacks_smtputf8(start_proxy) -> None:
    b = await _backend(smtputf8=False)
    try:
        proxy = await start_proxy(backend_port=b.port)
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            await c.cmd("EHLO client.test")
            r = await c.cmd("MAIL FROM:<jörg@sender.example> SMTPUTF8")
            assert r.code == 553 and r.text.startswith("5.6.7")
        assert b.messages == []
    finally:
        await b.stop()


async def test_pooled_connection_closed_by_backend_is_replaced(
    backend: RecordingBackend, start_proxy
) -> None:
    proxy = await start_proxy()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    # The backend restarts: the idle pooled connection is dead.
    port = backend.port
    await backend.stop()
    for conn in list(proxy.app.backend._idle):  # type: ignore[attr-defined]
        conn.client.close()
    await backend.start(port)
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
    assert len(backend.messages) == 2


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.sampled_from([b"a", b".", b"..", b"\r\n", b"\n", b"\r", b"\r\n.", b"x\r\n.\r\n"]), max_size=12
    ).map(b"".join)
)
def test_wire_content_matches_aiosmtplib_normalisation(message: bytes) -> None:
    from aiosmtplib.protocol import PERIOD_REGEX, normalize_message_line_endings

    if not message:
        assert wire_content(message) == b".\r\n"  # aiosmtplib would add an empty line
        return
    expected = PERIOD_REGEX.sub(b"..", normalize_message_line_endings(message))
    if expected and not expected.endswith(b"\r\n"):
        expected += b"\r\n"
    assert wire_content(message) == expected + b".\r\n"


async def test_backend_refusing_data_command_is_mirrored_and_connection_reused(start_proxy) -> None:
    b = await _backend()
    try:
        proxy = await start_proxy(backend_port=b.port)
        b.data_command_reply = "554 5.5.0 No DATA for you"
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            r = await c.send_message("s@sender.example", ["user@example.org"], make_message())
            assert (r.code, r.text) == (554, "5.5.0 No DATA for you")
            b.data_command_reply = None
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message())
            ).code == 250
        assert len(b.messages) == 1 and "RSET" in b.commands
    finally:
        await b.stop()
