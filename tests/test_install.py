"""The README's "Install as a service" steps, run under a scratch prefix, then the installed proxy.

Each line of the README's install block runs as written, with its absolute paths
(``/opt``, ``/etc``, ``/usr/local``, ``/var/lib``) moved under a temporary root.
Three lines need a real Debian machine and are left out: ``apt install`` (the
test already runs on a Python with venv), ``useradd`` (root, and a user database
we must not touch) and ``systemctl`` (systemd as PID 1). The unit file the steps
installed is checked with ``systemd-analyze verify`` instead.

To work offline and fast, the new venv sees the test venv's libraries through a
``.pth`` file, so ``pip install .`` finds every dependency installed and only
builds smtpproxy itself (its build backend comes from the configured index).
"""

from __future__ import annotations

import email.message
import json
import os
import re
import shutil
import site
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest

from tests.dnsserver import DnsServer
from tests.procs import ROOT, free_port, wait_port
from tests.smtpclient import make_message

SKIPPED = ("apt ", "useradd ", "systemctl ")
PREFIXES = ("/opt/", "/etc/", "/usr/local/", "/var/lib/")


def install_steps() -> list[str]:
    """The shell lines of the README block after the install-steps marker."""
    text = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- install-steps:.*?-->\n```sh\n(.*?)```", text, re.S)
    assert block, "README.md lost its install-steps block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def under(root: Path, line: str) -> str:
    """``line`` with the system paths moved under ``root`` and ``smtpproxy`` the linked script."""
    for prefix in PREFIXES:
        line = re.sub(rf"(?<![\w.]){re.escape(prefix)}", f"{root}{prefix}", line)
    if line.startswith("python3 "):
        line = sys.executable + line[len("python3") :]
    if line.startswith("smtpproxy "):
        line = f"{root}/usr/local/bin/smtpproxy" + line[len("smtpproxy") :]
    return line


def source_release(dest: Path) -> Path:
    """The source tree as a release unpacks it (no venv, no caches, no git)."""
    ignore = shutil.ignore_patterns(".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*cache*")
    return Path(shutil.copytree(ROOT, dest, ignore=ignore))


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root with the README's install done in it."""
    base = tmp_path_factory.mktemp("install")
    root, src = base / "root", source_release(base / "smtpproxy-src")
    env = {"PATH": "/usr/bin:/bin", "HOME": str(base), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_")})
    for folder in ("opt", "etc", "usr/local/bin", "var/lib"):  # what a fresh Debian has
        (root / folder).mkdir(parents=True)
    for line in install_steps():
        if line.startswith(SKIPPED):
            continue
        result = subprocess.run(
            ["bash", "-euo", "pipefail", "-c", under(root, line)],
            cwd=src,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"
        if line.startswith("python3 -m venv"):
            # The test venv's libraries stand in for the registry (see the module docstring).
            (site_dir,) = (root / "opt" / "smtpproxy" / "lib").glob("python3*/site-packages")
            (site_dir / "_test_libraries.pth").write_text(site.getsitepackages()[0] + "\n")
    return root


def test_every_step_is_run_or_needs_a_real_machine() -> None:
    steps = install_steps()
    assert [s for s in steps if s.startswith(SKIPPED)] == [
        "apt install python3-venv",
        "useradd --system --home-dir /var/lib/smtpproxy --no-create-home --shell /usr/sbin/nologin smtpproxy",
        "systemctl daemon-reload",
        "systemctl enable --now smtpproxy",
    ]


def test_the_install_puts_everything_where_the_readme_says(installed: Path) -> None:
    script = installed / "opt" / "smtpproxy" / "bin" / "smtpproxy"
    assert (installed / "usr" / "local" / "bin" / "smtpproxy").resolve() == script.resolve()
    for path in (
        "etc/smtpproxy/smtpproxy.yaml",
        "etc/smtpproxy/rules/10-attachments.yaml",
        "etc/smtpproxy/rules/lists/executable_extensions.txt",
        "etc/smtpproxy/smtpproxy.service.d/config.conf",
        "etc/systemd/system/smtpproxy.service",
        "usr/local/share/man/man1/smtpproxy.1",
        "etc/bash_completion.d/smtpproxy",
    ):
        assert (installed / path).is_file(), path
    # The installed package carries its own rules, wherever it lives.
    where = subprocess.run(
        [str(script), "rules", "path"], capture_output=True, text=True, cwd="/", check=True
    )
    packaged = Path(where.stdout.strip())
    assert packaged.is_relative_to(installed / "opt" / "smtpproxy"), packaged
    assert (packaged / "lists" / "executable_extensions.txt").is_file()
    version = subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True)
    from smtpproxy import __version__

    assert version.stdout.startswith(f"smtpproxy {__version__}\n")


def test_the_installed_service_filters_with_the_shipped_config(
    installed: Path, dns_server: DnsServer
) -> None:
    config = installed / "etc" / "smtpproxy" / "smtpproxy.yaml"
    state = installed / "var" / "lib" / "smtpproxy"
    state.mkdir(parents=True, exist_ok=True)  # systemd's StateDirectory= and WorkingDirectory=
    port = free_port()
    # What the operator changes with $EDITOR; everything else stays as `init` wrote it.
    edited = installed / "etc" / "smtpproxy" / "edited.yaml"
    edited.write_text(
        config.read_text() + f'\nlisten: "127.0.0.1:{port}"\nmetrics: null\nhostname: "mx.example.org"\n'
        f'dns: {{nameservers: ["{dns_server.address}"], reverse_lookup: false, timeout: 3.0}}\n'
    )
    proc = subprocess.Popen(
        [str(installed / "opt" / "smtpproxy" / "bin" / "smtpproxy"), "serve", "--config", str(edited)],
        cwd=state,
        env={"PATH": "/usr/bin:/bin"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_port(port, timeout=30)
        exe = email.message.EmailMessage()
        exe["From"], exe["To"], exe["Subject"] = "a@sender.example", "user@example.org", "invoice"
        exe["Message-ID"], exe["Date"] = "<x1@sender.example>", "Sat, 28 Nov 2026 10:00:00 +0000"
        exe.set_content("see attachment")
        exe.add_attachment(
            b"MZ\x90\x00", maintype="application", subtype="octet-stream", filename="invoice.exe"
        )
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            s.ehlo("mail.sender.example")
            s.sendmail("a@sender.example", ["user@example.org"], make_message())
            with pytest.raises(smtplib.SMTPDataError) as refused:
                s.sendmail("a@sender.example", ["user@example.org"], exe.as_bytes())
        assert (refused.value.smtp_code, refused.value.smtp_error) == (
            554,
            b"5.7.1 Executable attachments are not accepted",
        )
        # The default maildir of the working folder (/var/lib/smtpproxy), not /etc's.
        (delivered,) = list((state / "var" / "mail" / "new").iterdir())
        assert delivered.read_bytes().endswith(make_message())
        assert not (installed / "etc" / "smtpproxy" / "var").exists()
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert "reject_executable_attachment" in stderr  # the packaged rule, in the transaction log
    (start,) = [json.loads(line) for line in stderr.splitlines() if '"msg": "listening"' in line]
    assert start["rules_folder"] == str(installed / "etc" / "smtpproxy" / "rules")
    assert start["rules"] == 10 and start["relay_domains"] == 2
    assert "absl" not in stderr and "Traceback" not in stderr


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed (Debian: systemd)"
)
def test_the_installed_unit_passes_systemd_analyze_verify(installed: Path, tmp_path: Path) -> None:
    unit = (installed / "etc" / "systemd" / "system" / "smtpproxy.service").read_text()
    assert "ExecStart=/opt/smtpproxy/bin/smtpproxy serve --config /etc/smtpproxy/smtpproxy.yaml\n" in unit
    # verify checks that the program and the man page exist: point it at the scratch install's.
    local = tmp_path / "smtpproxy.service"
    local.write_text(unit.replace("=/opt/smtpproxy/", f"={installed}/opt/smtpproxy/"))
    env = {"PATH": "/usr/bin:/bin", "MANPATH": str(installed / "usr" / "local" / "share" / "man")}
    result = subprocess.run(
        ["systemd-analyze", "verify", str(local)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
