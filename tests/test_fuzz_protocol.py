"""Protocol fuzzing: random command sequences, split at random byte boundaries, against the running proxy.

Invariants for every example: each reply is a well-formed SMTP reply, the proxy
keeps serving, and a message is in the backend exactly when its client got 250
to the final dot (with its content intact), never otherwise.
"""

from __future__ import annotations

import asyncio
import re
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpproxy.app import App
from smtpproxy.config import build_config
from tests.backends import RecordingBackend
from tests.conftest import proxy_config
from tests.dnsserver import DnsServer

REPLY = re.compile(rb"^[2-5]\d\d[ -][^\r\n]*\r\n")


@dataclass
class Served:
    """A proxy and its backend running in their own event loop thread."""

    loop: asyncio.AbstractEventLoop
    backend: RecordingBackend
    port: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    dns = DnsServer({})
    dns.start()
    tmp: Path = tmp_path_factory.mktemp("fuzz")

    async def start() -> tuple[App, RecordingBackend]:
        backend = RecordingBackend()
        await backend.start()
        data = proxy_config(
            backend.port, {"limits": {"max_recipients": 5, "idle_timeout": 5}}, tmp, dns.address
        )
        data["session_limits"] = {"max_invalid_commands": 1000, "max_errors": 1000}
        app = App(build_config(data, base_dir=tmp))
        await app.start()
        return app, backend

    app, backend = asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    yield Served(loop, backend, app.listen_port_address[1])
    asyncio.run_coroutine_threadsafe(app.stop(0.5), loop).result(10)
    asyncio.run_coroutine_threadsafe(backend.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(5)
    dns.stop()


class Client:
    """A blocking client that sends in given chunk sizes and checks every reply line."""

    def __init__(self, port: int, chunk: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.chunk = chunk
        self.buffer = b""

    def send(self, data: bytes) -> None:
        for i in range(0, len(data), self.chunk):
            self.sock.sendall(data[i : i + self.chunk])

    def reply(self) -> int | None:
        """The code of the next complete reply; None when the server closed."""
        while True:
            while b"\r\n" not in self.buffer:
                data = self.sock.recv(65536)
                if not data:
                    return None
                self.buffer += data
            line, _, self.buffer = self.buffer.partition(b"\r\n")
            line += b"\r\n"
            assert REPLY.match(line), f"malformed reply {line!r}"
            if line[3:4] == b" ":
                return int(line[:3])

    def close(self) -> None:
        self.sock.close()


words = st.sampled_from(["a", "b", "x" * 40, ".", "..", " ", "é", "\t"])
bodies = st.lists(
    st.sampled_from(
        [b"line", b".", b"..", b".dot", b"", b"\xc3\xa9t\xc3\xa9", b"x" * 200, b"a\nb", b"tab\tx"]
    ),
    max_size=8,
).map(lambda lines: b"".join(line + b"\r\n" for line in lines))
commands = st.one_of(
    st.sampled_from(
        [
            b"EHLO client.test",
            b"HELO client.test",
            b"EHLO",
            b"MAIL FROM:<s@sender.example>",
            b"MAIL FROM:<>",
            b"MAIL FROM:<s@sender.example> BODY=8BITMIME SMTPUTF8",
            b"MAIL FROM:<j\xc3\xb6rg@sender.example> SMTPUTF8",
            b"MAIL FROM:<broken",
            b"MAIL FROM:<s@sender.example> SIZE=999999999999",
            b"RCPT TO:<user@example.org>",
            b"RCPT TO:<other@example.org>",
            b"RCPT TO:<victim@elsewhere.example>",
            b"RCPT TO:<>",
            b"RCPT TO:<@x:y@example.org>",
            b"RSET",
            b"NOOP",
            b"VRFY user",
            b"HELP",
            b"STARTTLS",
            b"AUTH PLAIN AGEAYg==",
            b"BDAT 10 LAST",
            b"\x00\x01\x02",
            b"\xff\xfe garbage",
            b"",
            b"Q" * 2000,
            b"DATA extra",
        ]
    ),
    st.lists(words, min_size=1, max_size=4).map(lambda w: ("EHLO " + "".join(w)).encode()),
    st.builds(lambda body: ("DATA", body), bodies),
)


@settings(
    max_examples=400,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(script=st.lists(commands, min_size=1, max_size=12), chunk=st.sampled_from([1, 3, 16, 4096]))
def test_random_sessions_keep_the_invariant(served: Served, script: list[Any], chunk: int) -> None:
    backend = served.backend
    client = Client(served.port, chunk)
    expected: list[bytes] = []
    try:
        assert client.reply() == 220
        for item in script:
            if isinstance(item, tuple):
                client.send(b"DATA\r\n")
                code = client.reply()
                if code is None:
                    break
                if code != 354:
                    continue
                body = item[1]
                lines = body.split(b"\r\n")[:-1]
                stuffed = b"".join(
                    (b"." if line.startswith(b".") else b"") + line + b"\r\n" for line in lines
                )
                before = len(backend.messages)
                client.send(stuffed + b".\r\n")
                code = client.reply()
                if code is None:
                    break
                if code == 250:
                    expected.append(body)
                    assert len(backend.messages) == before + 1
                    # Bare LF is normalised to CRLF on the way out (anti-smuggling); nothing else changes.
                    wire = re.sub(rb"(?<!\r)\n", b"\r\n", body)
                    assert backend.messages[-1].content.endswith(wire), "content changed on the way"
                else:
                    assert len(backend.messages) == before, "refused message reached the backend"
                continue
            client.send(item + b"\r\n")
            if client.reply() is None:
                break
    finally:
        client.close()
    # The next client is served.
    probe = Client(served.port, 4096)
    try:
        assert probe.reply() == 220
        probe.send(b"QUIT\r\n")
        assert probe.reply() == 221
    finally:
        probe.close()
