"""The proxy as users run it: CLI errors, the maildir default, SIGTERM drain, swaks and smtp-sink."""

from __future__ import annotations

import signal
import smtplib
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.procs import ROOT, ProxyProcess, free_port, have, tool, wait_port
from tests.smtpclient import make_message


def hermetic_dns(server: DnsServer) -> dict[str, object]:
    """The ``dns`` section for a proxy process: the test DNS server, never the machine's resolver."""
    return {"reverse_lookup": False, "nameservers": [server.address], "timeout": 3.0}


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "smtpproxy", *args],
        capture_output=True,
        text=True,
        cwd=cwd or ROOT,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        timeout=60,
    )


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("listen: 127.0.0.1:2525\nbogus_key: 1\n", "bogus_key: unknown key"),
        ("limits:\n  max_recipients: ten\n", "limits.max_recipients: "),
        (
            "limits:\n  max_recipients: 0\n",
            "limits.max_recipients: input should be greater than or equal to 1",
        ),
        ("backend: ftp://x\n", "backend: expected smtp://host:port"),
        ("listen: nonsense\n", "listen: expected host:port"),
        ("relay_domains: [a, [b]]\n", "relay_domains.1"),
        ("relay_domains: ['a b']\n", "relay_domains: expected domain names, got 'a b'"),
        ("dmarc: {trusted_arc_sealers: ['']}\n", "dmarc.trusted_arc_sealers: expected domain names"),
        ("listen: [unclosed\n", "invalid YAML"),
        ("tls: {cert: /x.pem}\n", "tls: cert and key must be set together"),
    ],
)
def test_config_errors_name_the_key_and_exit_2(tmp_path: Path, content: str, expected: str) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(content)
    result = run_cli("serve", "--config", str(cfg))
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert str(cfg) in result.stderr
    assert "Traceback" not in result.stderr


# Values that used to pass `smtpproxy config` and then switched protection off (or
# failed later without naming the key): each is now an error naming key, value and
# what was expected, at `config` and at `serve` alike.
SILENT_BEFORE = [
    (
        "tls: {cert: cert.pem, key: key.pem}\nrules: null\n",
        "tls.cert: expected a PEM certificate chain file, got 'cert.pem' (no such file: ",
    ),
    (
        "tls: {cert: cert.pem, key: key.pem}\nrules: null\n",
        "tls.key: expected a PEM private key file, got 'key.pem' (no such file: ",
    ),
    (
        "rules: no-rules\n",
        "rules: expected an existing folder of rule files (or null for no rules), got 'no-rules' (no such folder: ",
    ),
    (
        "dns: {nameservers: ['not-an-ip']}\nrules: null\n",
        "dns.nameservers: expected nameserver IP addresses (IP, IP:port or [IPv6]:port), got 'not-an-ip'",
    ),
    (
        "backend: maildir:mial/inbox\nrules: null\n",
        "backend: expected maildir:PATH whose folder or parent folder exists, got 'maildir:mial/inbox' (no such folder: ",
    ),
    (
        "scores: {quarantine_to: 'maildir:/nonexistent-q/spam'}\nrules: null\n",
        "scores.quarantine_to: expected maildir:PATH whose folder or parent folder exists, "
        "got 'maildir:/nonexistent-q/spam' (no such folder: /nonexistent-q)",
    ),
]


@pytest.mark.parametrize("command", ["config", "serve"])
@pytest.mark.parametrize(("content", "expected"), SILENT_BEFORE)
def test_values_that_would_disable_protection_stop_the_start(
    tmp_path: Path, command: str, content: str, expected: str
) -> None:
    cfg = tmp_path / "smtpproxy.yaml"
    cfg.write_text(content)
    result = run_cli(command, "--config", str(cfg))
    assert result.returncode == 2, result.stdout + result.stderr
    assert expected in result.stderr
    assert str(cfg) in result.stderr
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr


@pytest.mark.parametrize("command", ["config", "serve"])
def test_tls_files_that_do_not_load_stop_the_start(tmp_path: Path, command: str) -> None:
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    cfg = tmp_path / "smtpproxy.yaml"
    cfg.write_text("tls: {cert: cert.pem, key: key.pem}\nrules: null\n")
    result = run_cli(command, "--config", str(cfg))
    assert result.returncode == 2, result.stderr
    assert (
        "tls: expected cert and key files that load as a certificate and its key, got 'cert.pem' and 'key.pem'"
        in (result.stderr)
    )


def test_every_problem_line_says_got_once(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text(
        "listen: 127.0.0.1:99999\nmetrics: '[::1'\nrelay_domains: ['a b']\nrelay_networks: [10.0.0.0/33]\n"
        "dns: {nameservers: [not-an-ip, '127.0.0.1:99999']}\nproxy_protocol: {trusted_networks: [nonsense]}\n"
        "scores: {add_header: 10, reject: 5}\nlimits: {max_recipients: ten}\nlog: {level: loud}\n"
        "ratelimits: [{name: x, key: [bogus], rate: 1/s}]\nbackend: 'smtp://x:99999'\n"
    )
    result = run_cli("config", "--config", str(cfg))
    assert result.returncode == 2
    lines = result.stderr.splitlines()[1:]
    assert len(lines) == 12, result.stderr
    for line in lines:
        assert line.count("got") == 1, line
    assert "  listen: expected host:port with a port number 0..65535, got '127.0.0.1:99999'" in lines
    assert "  relay_networks: expected CIDR networks like 10.0.0.0/8, got '10.0.0.0/33'" in lines
    assert (
        "  dns.nameservers: expected nameserver IP addresses (IP, IP:port or [IPv6]:port), got 'not-an-ip', '127.0.0.1:99999'"
        in lines
    )
    assert "  scores: expected add_header <= reject, got add_header 10.0 > reject 5.0" in lines
    assert "  backend: expected smtp://host:port (port 0..65535), got 'smtp://x:99999'" in lines


def test_rules_null_means_no_rules_and_an_empty_folder_too(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpproxy.yaml"
    cfg.write_text("rules: null\n")
    result = run_cli("config", "--config", str(cfg))
    assert result.returncode == 0, result.stderr
    assert '"rules": null' in result.stdout
    checked = run_cli("rules", "check", "--config", str(cfg))
    assert (checked.returncode, checked.stdout.strip()) == (0, f"ok: no rules (rules: null in {cfg})")
    (tmp_path / "empty").mkdir()
    cfg.write_text("rules: empty\n")
    assert run_cli("rules", "check", "--config", str(cfg)).stdout.startswith("ok: 0 rules")


def test_rules_check_of_a_folder_that_does_not_exist_exits_2(tmp_path: Path) -> None:
    result = run_cli("rules", "check", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert f"error: rules folder {tmp_path / 'nope'}: no such folder" in result.stderr


def test_maildir_may_be_created_inside_an_existing_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "smtpproxy.yaml"
    cfg.write_text("backend: maildir:mail\nrules: null\n")
    assert run_cli("config", "--config", str(cfg)).returncode == 0


def test_missing_config_file_exits_2(tmp_path: Path) -> None:
    result = run_cli("serve", "--config", str(tmp_path / "nope.yaml"))
    assert result.returncode == 2
    assert "nope.yaml" in result.stderr and "file not found" in result.stderr


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    cfg = tmp_path / "conf" / "smtpproxy.yaml"
    cfg.parent.mkdir()
    (cfg.parent / "myrules").mkdir()  # found next to the config, not in the current folder
    cfg.write_text("backend: maildir:mail\nrules: myrules\n")
    result = run_cli("config", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    from smtpproxy.config import load_config

    config = load_config(cfg)
    assert config.maildir_path == cfg.parent / "mail"
    assert config.rules_path == cfg.parent / "myrules"


def test_a_rules_folder_that_does_not_exist_refuses_to_start(tmp_path: Path) -> None:
    """Without its rules folder a config would filter nothing: it refuses to start."""
    cfg = tmp_path / "smtpproxy.yaml"
    cfg.write_text("rules: rules\n")
    result = run_cli("serve", "--config", str(cfg), cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert f"error: invalid configuration in {cfg}:" in result.stderr
    assert (
        f"rules: expected an existing folder of rule files (or null for no rules), got 'rules' (no such folder: {tmp_path / 'rules'})"
        in (result.stderr)
    )


def test_embedded_defaults_deliver_into_maildir(tmp_path: Path, dns_server: DnsServer) -> None:
    """``smtpproxy serve`` with no config: mail for example.org lands in ./var/mail/new."""
    port = 2525
    try:
        wait_port(port, timeout=0.1)
        pytest.skip("port 2525 is in use on this machine")
    except TimeoutError:
        pass
    # The embedded defaults read the machine's resolv.conf: the test DNS server stands in for it.
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.system_resolver", dns_server.address, "serve"],
        cwd=tmp_path,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(port)
        with smtplib.SMTP("127.0.0.1", port) as s:
            s.sendmail("a@sender.example", ["user@example.org"], make_message())
        files = list((tmp_path / "var" / "mail" / "new").iterdir())
        assert len(files) == 1
        data = files[0].read_bytes()
        assert data.startswith(b"Return-Path: <a@sender.example>\r\nReceived: from ")
        assert data.endswith(make_message())
    finally:
        proc.terminate()
        assert proc.wait(15) == 0


class _SlowSink(threading.Thread):
    """A backend that takes its time before answering the final dot."""

    def __init__(self, port: int, delay: float) -> None:
        super().__init__(daemon=True)
        self.port, self.delay, self.delivered = port, delay, 0

    def run(self) -> None:
        import asyncio

        from aiosmtpd.controller import Controller

        sink = self

        class Handler:
            async def handle_DATA(self, server, session, envelope):  # type: ignore[no-untyped-def]
                await asyncio.sleep(sink.delay)
                sink.delivered += 1
                return "250 2.0.0 Ok"

        self.controller = Controller(Handler(), hostname="127.0.0.1", port=self.port)
        self.controller.start()


def test_sigterm_lets_the_transaction_in_flight_complete(tmp_path: Path, dns_server: DnsServer) -> None:
    sink = _SlowSink(free_port(), delay=1.5)
    sink.start()
    wait_port(sink.port)
    proxy = ProxyProcess(
        tmp_path,
        {
            "backend": f"smtp://127.0.0.1:{sink.port}",
            "relay_domains": ["example.org"],
            "shutdown_grace": 10,
            "dns": hermetic_dns(dns_server),
        },
    ).start()
    result: dict[str, object] = {}

    def send() -> None:
        with smtplib.SMTP("127.0.0.1", proxy.port) as s:
            result["refused"] = s.sendmail("a@sender.example", ["user@example.org"], make_message())

    sender = threading.Thread(target=send)
    sender.start()
    time.sleep(0.7)  # the message is now waiting on the slow backend
    assert proxy.proc is not None
    proxy.proc.send_signal(signal.SIGTERM)
    sender.join(20)
    assert result.get("refused") == {}, proxy.log()
    assert sink.delivered == 1
    assert proxy.stop() == 0
    sink.controller.stop()


@pytest.mark.skipif(not have("swaks"), reason="swaks is not installed (CI installs it)")
def test_swaks_happy_path_through_the_proxy_into_maildir(tmp_path: Path, dns_server: DnsServer) -> None:
    proxy = ProxyProcess(
        tmp_path,
        {"backend": "maildir:mail", "relay_domains": ["example.org"], "dns": hermetic_dns(dns_server)},
    ).start()
    try:
        out = subprocess.run(
            [
                tool("swaks"),
                "--server",
                f"127.0.0.1:{proxy.port}",
                "--to",
                "user@example.org",
                "--from",
                "sender@sender.example",
                "--body",
                "hello from swaks",
            ],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "250 2.0.0 Ok: queued as" in out.stdout
        files = list((tmp_path / "mail" / "new").iterdir())
        assert len(files) == 1 and b"hello from swaks" in files[0].read_bytes()
    finally:
        assert proxy.stop() == 0


@pytest.mark.skipif(not have("smtp-sink"), reason="postfix smtp-sink is not installed (CI installs postfix)")
def test_postfix_smtp_sink_as_backend(tmp_path: Path, dns_server: DnsServer) -> None:
    sink_port = free_port()
    dump = tmp_path / "dump"
    dump.mkdir()
    sink = subprocess.Popen(
        [tool("smtp-sink"), "-u", "root", "-d", str(dump) + "/%M%S.", f"127.0.0.1:{sink_port}", "10"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(sink_port)
        proxy = ProxyProcess(
            tmp_path,
            {
                "backend": f"smtp://127.0.0.1:{sink_port}",
                "relay_domains": ["example.org"],
                "dns": hermetic_dns(dns_server),
            },
        ).start()
        try:
            with smtplib.SMTP("127.0.0.1", proxy.port) as s:
                for i in range(3):
                    s.sendmail("a@sender.example", ["user@example.org"], make_message(subject=f"n{i}"))
        finally:
            assert proxy.stop() == 0
        deadline = time.monotonic() + 5
        while len(list(dump.iterdir())) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        dumped = [p.read_bytes() for p in dump.iterdir()]
        assert len(dumped) == 3
        assert all(b"by " in d and b"(smtpproxy) with ESMTP" in d for d in dumped)
    finally:
        sink.terminate()
        sink.wait(5)
