"""A real ``redis-server`` on a free loopback port, for tests: start, stop, start again.

No persistence (``--save "" --appendonly no``), its own temporary folder, the
same port across restarts so clients can reconnect. Tests that need it skip
with a clear reason when ``redis-server`` is not installed
(Debian: ``apt-get install redis-server``).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = shutil.which("redis-server")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """One redis-server process on 127.0.0.1:``port``, data in ``folder``."""

    def __init__(self, folder: Path, port: int | None = None, extra: dict[str, str] | None = None) -> None:
        if REDIS_SERVER is None:
            raise RuntimeError("redis-server is not installed")
        self.folder = folder
        self.port = port or free_port()
        self.extra = extra or {}
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:PORT/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start and wait (bounded) until it answers PING."""
        assert REDIS_SERVER is not None
        options = {
            "port": str(self.port),
            "bind": "127.0.0.1",
            "save": "",
            "appendonly": "no",
            "dir": str(self.folder),
            "protected-mode": "no",
            "loglevel": "warning",
            **self.extra,
        }
        args = [REDIS_SERVER] + [a for k, v in options.items() for a in (f"--{k}", v)]
        self.proc = subprocess.Popen(
            args,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode} (port {self.port} taken?)"
                )
            if self.ping():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"redis-server did not answer on port {self.port} within {timeout}s")

    def ping(self) -> bool:
        """True when the server answers PING (a raw RESP exchange, no client library)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def command(self, *args: str) -> bytes:
        """Send one command and return the raw reply (for test assertions)."""
        payload = f"*{len(args)}\r\n".encode() + b"".join(
            f"${len(a.encode())}\r\n{a}\r\n".encode() for a in args
        )
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as s:
            s.sendall(payload)
            return s.recv(65536)

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s)."""
        if self.proc is None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.proc = None


class Sentinel:
    """A redis-server in sentinel mode watching ``master`` as service ``mymaster``."""

    def __init__(self, folder: Path, master: RedisServer) -> None:
        assert REDIS_SERVER is not None
        self.port = free_port()
        conf = folder / "sentinel.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\ndir {folder}\n"
            f"sentinel monitor mymaster 127.0.0.1 {master.port} 1\n"
        )
        self.proc = subprocess.Popen(
            [REDIS_SERVER, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    @property
    def url(self) -> str:
        """``redis+sentinel://127.0.0.1:PORT/mymaster``."""
        return f"redis+sentinel://127.0.0.1:{self.port}/mymaster"

    def stop(self) -> None:
        """SIGTERM and wait."""
        self.proc.terminate()
        self.proc.wait(timeout=5)


def create_cluster(nodes: list[RedisServer], timeout: float = 20.0) -> None:
    """Join ``nodes`` (started with cluster-enabled) into one cluster and wait until it is ok."""
    cli = shutil.which("redis-cli")
    assert cli is not None
    addresses = [f"127.0.0.1:{n.port}" for n in nodes]
    subprocess.run(
        [cli, "--cluster", "create", *addresses, "--cluster-yes"], check=True, capture_output=True, timeout=60
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if all(b"cluster_state:ok" in n.command("CLUSTER", "INFO") for n in nodes):
            return
        time.sleep(0.1)
    raise RuntimeError("the Redis cluster did not become ok")


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A running redis-server for one test; skipped when redis-server is not installed."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    server = RedisServer(tmp_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()
