"""Helpers to run the proxy and external tools as real processes."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A currently free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, timeout: float = 10.0) -> None:
    """Block until something listens on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on port {port}")


def have(tool: str) -> bool:
    """True when an external program is installed (postfix tools live in /usr/sbin)."""
    return shutil.which(tool) is not None or shutil.which(tool, path="/usr/sbin:/usr/bin") is not None


def tool(name: str) -> str:
    """Full path of an external program."""
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin") or name


class ProxyProcess:
    """``python -m smtpproxy serve --config FILE`` in a subprocess."""

    def __init__(self, tmp: Path, config: dict[str, Any]) -> None:
        self.port = free_port()
        self.metrics_port = free_port()
        # No rules unless the test brings some: a rules folder that does not exist is a config error.
        config = {
            "listen": f"127.0.0.1:{self.port}",
            "metrics": f"127.0.0.1:{self.metrics_port}",
            "rules": None,
            **config,
        }
        self.config_path = tmp / "smtpproxy.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = tmp / "proxy.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ProxyProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "smtpproxy", "serve", "--config", str(self.config_path)],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.config_path.parent,
            )
        try:
            wait_port(self.port)
        except TimeoutError:
            self.stop()
            raise AssertionError(f"proxy did not start:\n{self.log_path.read_text()}") from None
        return self

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
