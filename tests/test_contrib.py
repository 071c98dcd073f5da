"""What operators find next to the code: Postfix snippets, Dockerfile, LICENSE, CHANGELOG, dev.py, ports."""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest

from smtpproxy import __version__
from smtpproxy.config import Config
from tests.procs import ROOT

POSTCONF = shutil.which("postconf") or "/usr/sbin/postconf"


def postconf(folder: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [POSTCONF, "-c", str(folder), *args], capture_output=True, text=True, timeout=60, check=False
    )


@pytest.mark.skipif(not Path(POSTCONF).exists(), reason="postconf not installed (Debian: postfix)")
def test_postfix_snippets_are_parameters_postfix_knows(tmp_path: Path) -> None:
    contrib = ROOT / "contrib" / "postfix"
    (tmp_path / "main.cf").write_text((contrib / "main.cf.gateway").read_text())
    (tmp_path / "master.cf").write_text((contrib / "master.cf.same-host").read_text())
    main = postconf(tmp_path, "-n")
    assert main.returncode == 0 and main.stderr == "", main.stderr
    assert "smtpd_authorized_xclient_hosts = 192.0.2.25" in main.stdout
    master = postconf(tmp_path, "-P")
    assert master.returncode == 0 and master.stderr == "", master.stderr
    assert "127.0.0.1:10025/inet/smtpd_authorized_xclient_hosts = 127.0.0.1" in master.stdout
    # The check itself works: an unknown parameter is reported.
    (tmp_path / "main.cf").write_text("smtpd_authorised_xclient_hosts = 192.0.2.25\n")
    assert "unused parameter" in postconf(tmp_path, "-n").stderr


def test_the_readme_backend_port_matches_the_postfix_snippet() -> None:
    readme = (ROOT / "contrib" / "postfix" / "README.md").read_text()
    assert 'backend: "smtp://127.0.0.1:10025"' in readme
    assert (ROOT / "contrib" / "postfix" / "master.cf.same-host").read_text().count(
        "127.0.0.1:10025 inet"
    ) == 1


def dockerfile() -> str:
    return (ROOT / "Dockerfile").read_text()


def test_dockerfile_runs_the_packaged_config_as_a_non_root_user_on_debian_slim() -> None:
    text = dockerfile()
    bases = re.findall(r"^FROM (\S+)", text, re.M)
    assert bases and all(re.fullmatch(r"python:3\.1[1-9]-slim-(bookworm|trixie)( AS \w+)?", b) for b in bases)
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == ["smtpproxy"]
    assert text.index("USER smtpproxy") < text.index("CMD ")
    assert "smtpproxy init /etc/smtpproxy" in text
    assert text.rstrip().endswith(
        'CMD ["/opt/smtpproxy/bin/smtpproxy", "serve", "--config", "/etc/smtpproxy/smtpproxy.yaml"]'
    )
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "var"} <= set(ignored)


def docker_works() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=60, check=False).returncode == 0


@pytest.mark.skipif(
    not docker_works(), reason="no working docker here (`docker info` fails): Dockerfile checked statically"
)
def test_docker_image_builds_and_answers_version() -> None:
    tag = f"smtpproxy-test:{__version__}"
    subprocess.run(["docker", "build", "-q", "-t", tag, str(ROOT)], check=True, timeout=1800)
    out = subprocess.run(
        ["docker", "run", "--rm", tag, "/opt/smtpproxy/bin/smtpproxy", "--version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    )
    assert out.stdout.startswith(f"smtpproxy {__version__}\n")
    who = subprocess.run(
        ["docker", "run", "--rm", tag, "id", "-un"], capture_output=True, text=True, check=True, timeout=300
    )
    assert who.stdout.strip() == "smtpproxy"


def test_license_is_the_mit_license_pyproject_names() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == {"text": "MIT"}
    assert (ROOT / "LICENSE").read_text().startswith("MIT License\n")


def test_changelog_has_an_entry_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## {re.escape(__version__)}\b", changelog, re.M)


def test_grafana_readme_ports_are_the_default_metrics_port() -> None:
    default = Config().metrics_address
    assert default is not None
    text = (ROOT / "grafana" / "README.md").read_text()
    ports = set(re.findall(r":(9\d{3})\b", text))
    assert ports == {str(default.port)}


def test_dev_py_reinstalls_only_when_pyproject_changes(tmp_path: Path) -> None:
    import dev

    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\n")
    venv = tmp_path / "venv"
    venv.mkdir()
    assert not dev.installed("", venv, tmp_path)
    (venv / ".smtpproxy-installed").write_text(dev.stamp("", tmp_path))
    assert dev.installed("", venv, tmp_path)
    assert not dev.installed("[test]", venv, tmp_path)  # the test tools are not there yet
    (venv / ".smtpproxy-installed").write_text(dev.stamp("[test]", tmp_path))
    assert dev.installed("", venv, tmp_path)  # [test] includes what `run` needs
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'x'\ndependencies = ['y']\n")
    assert not dev.installed("", venv, tmp_path)
