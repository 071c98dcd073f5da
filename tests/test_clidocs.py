"""The man page and the bash completion are generated from the argparse definitions and shipped."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from smtpproxy.cli import build_parser
from smtpproxy.clidocs import bash_completion, commands, man_page
from tests.procs import ROOT

CONTRIB = ROOT / "contrib"


def test_the_shipped_man_page_and_completion_are_the_generated_ones() -> None:
    # On failure: python -m smtpproxy.clidocs man > contrib/smtpproxy.1 (and bash > ...).
    assert (CONTRIB / "smtpproxy.1").read_text() == man_page()
    assert (CONTRIB / "smtpproxy.bash-completion").read_text() == bash_completion()


def test_the_man_page_has_every_command_and_option() -> None:
    page = man_page()
    for cmd in commands(build_parser()):
        if cmd.words:
            assert f".B smtpproxy {' '.join(cmd.words)}\n" in page
        for action in cmd.options:
            assert action.option_strings[0].replace("-", "\\-") in page


@pytest.mark.skipif(shutil.which("man") is None, reason="man is not installed")
def test_man_renders_the_page_without_warnings() -> None:
    result = subprocess.run(
        ["man", "--warnings", "-l", "-P", "cat", str(CONTRIB / "smtpproxy.1")],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "MANWIDTH": "80"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert "smtpproxy quarantine release" in result.stdout


@pytest.mark.parametrize(
    ("words", "expected"),
    [
        (["smtpproxy", ""], "serve config check init rules quarantine trace dkim"),
        (["smtpproxy", "trace", "--qu"], "--queue-id"),
        (["smtpproxy", "quarantine", "--config", "x.yaml", "re"], "release"),
        (["smtpproxy", "rules", "check", "--"], "--help --config"),
        (["smtpproxy", "--ver"], "--version"),
    ],
)
def test_bash_completion_completes_commands_and_options(words: list[str], expected: str) -> None:
    script = (
        f"source {CONTRIB / 'smtpproxy.bash-completion'}\n"
        f"COMP_WORDS=({' '.join(repr(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
        '_smtpproxy; echo "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == expected
    assert result.stderr == ""


def test_bash_completion_offers_files_after_config(tmp_path) -> None:
    (tmp_path / "smtpproxy.yaml").write_text("")
    script = (
        f"source {CONTRIB / 'smtpproxy.bash-completion'}\ncd {tmp_path}\n"
        "COMP_WORDS=(smtpproxy serve --config smtp); COMP_CWORD=3\n"
        '_smtpproxy; echo "${COMPREPLY[@]}"\n'
    )
    result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, check=True)
    assert result.stdout.strip() == "smtpproxy.yaml"
