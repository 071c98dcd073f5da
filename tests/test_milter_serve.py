"""``smtpproxy serve`` in milter mode as users run it: a unix socket (0660), SIGHUP reloads, SIGTERM drains."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from miltertest import MilterConnection
from miltertest import constants as c

from smtpproxy.config import ConfigError, build_config
from tests.dnsserver import DnsServer
from tests.procs import ROOT

ACTIONS = c.SMFI_V6_ACTS & ~c.SMFIF_SETSYMLIST  # miltertest cannot read macro lists
REJECT_RULE = """\
- name: no_reload_test
  if: {subject: {contains: after reload}}
  then: {reject: {code: 550, enhanced: "5.7.1", text: "Refused after the reload"}}
"""


def begin(path: Path) -> tuple[socket.socket, MilterConnection]:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(10)
    sock.connect(str(path))
    m = MilterConnection(sock)
    m.optneg_mta(ACTIONS)
    assert m.send_ar(c.SMFIC_CONNECT, hostname="unknown", family="4", port=1, address="192.0.2.9")[0] == "c"
    assert m.send_ar(c.SMFIC_MAIL, args=["<a@sender.example>"])[0] == "c"
    assert m.send_ar(c.SMFIC_RCPT, args=["<user@example.org>"])[0] == "c"
    return sock, m


def finish(m: MilterConnection, subject: str) -> Any:
    m._send(c.SMFIC_HEADER, name="Subject", value=f" {subject}")
    m._send(c.SMFIC_EOH)
    m._send(c.SMFIC_BODY, buf="Hi.\r\n")  # no reply: SMFIP_NR_BODY
    return m.send_eom()[-1]


def test_milter_only_serve_reloads_on_sighup_and_drains_on_sigterm(
    tmp_path: Path, dns_server: DnsServer
) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    path = tmp_path / "milter.sock"
    config = {
        "listen": None,
        "metrics": None,
        "milter": {"listen": f"unix:{path}"},
        "relay_domains": ["example.org"],
        "rules": "rules",
        "rules_options": {"reload_interval": 0},
        "shutdown_grace": 10,
        "spf": {"enabled": False},
        "dns": {"reverse_lookup": False, "nameservers": [dns_server.address], "timeout": 3.0},
    }
    (tmp_path / "smtpproxy.yaml").write_text(yaml.safe_dump(config))
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "smtpproxy", "serve", "--config", "smtpproxy.yaml"],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=tmp_path,
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
    try:
        deadline = time.monotonic() + 20
        while not path.exists():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
        assert stat.S_IMODE(path.stat().st_mode) == 0o660

        sock, m = begin(path)
        assert finish(m, "after reload")[0] == c.SMFIR_ACCEPT  # no rule yet
        sock.close()

        (rules / "10-reload.yaml").write_text(REJECT_RULE)
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.0)
        sock, m = begin(path)
        reply = finish(m, "after reload")
        assert reply[0] == c.SMFIR_REPLYCODE and "Refused after the reload" in str(reply[1]["text"])
        sock.close()

        # SIGTERM while a transaction is open: it completes, then the connection closes.
        sock, m = begin(path)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert finish(m, "in flight")[0] == c.SMFIR_ACCEPT
        assert sock.recv(1) == b""
        sock.close()
        assert proc.wait(15) == 0, log.read_text()
        assert not path.exists()
        text = log.read_text()
        assert '"milter": "unix:' in text and '"backend": null' in text, text
        assert '"mode": "milter"' in text or "mode=milter" in text, text
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"listen": None}, "listen: expected host:port, or null only with milter.listen set, got null"),
        ({"milter": {"listen": "unix:"}}, "milter.listen: expected unix:/path/to/socket with a path"),
        (
            {"milter": {"listen": "nonsense"}},
            "milter.listen: expected host:port or unix:/path, got 'nonsense'",
        ),
        (
            {"milter": {"listen": "127.0.0.1:11332"}, "workers": 2},
            "milter.listen: expected workers: 1 with a milter, got workers: 2",
        ),
    ],
)
def test_milter_config_errors_name_the_key(data: dict[str, Any], expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"rules": None, **data}, base_dir=tmp_path)
    assert any(expected in p for p in err.value.problems), err.value.problems


def test_milter_only_needs_no_backend(tmp_path: Path) -> None:
    config = build_config(
        {
            "listen": None,
            "milter": {"listen": "127.0.0.1:0"},
            "backend": "maildir:/nonexistent/x/y",
            "rules": None,
        },
        base_dir=tmp_path,
    )
    assert config.listen_address is None and config.milter.address is not None
