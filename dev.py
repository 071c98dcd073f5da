#!/usr/bin/env python3
"""Two commands for a fresh machine with only Python 3.11+ and pip.

    python3 dev.py run     create .venv, install smtpproxy, serve on the embedded defaults
    python3 dev.py test    create .venv, install smtpproxy with test tools, lint, type-check, run every test

Extra arguments after ``run`` go to ``smtpproxy serve`` (e.g. ``--config smtpproxy.yaml``);
after ``test`` they go to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")


def sh(*args: str | Path) -> None:
    print("+", " ".join(str(a) for a in args), flush=True)
    subprocess.run([str(a) for a in args], cwd=ROOT, check=True)


def stamp(extra: str, root: Path = ROOT) -> str:
    """What an install depends on: pyproject.toml (dependencies, entry points) and the extra.

    The install is editable, so changed sources need no reinstall; changed metadata does.
    """
    digest = hashlib.sha256((root / "pyproject.toml").read_bytes()).hexdigest()
    return f"{digest} {extra}\n"


def installed(extra: str, venv_dir: Path = VENV, root: Path = ROOT) -> bool:
    """True when ``venv_dir`` holds an install of ``root`` with ``extra`` (or with [test], a superset)."""
    marker = venv_dir / ".smtpproxy-installed"
    if not marker.exists():
        return False
    have = marker.read_text()
    return have in (stamp(extra, root), stamp("[test]", root))


def ensure_venv(extra: str) -> None:
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    if installed(extra):
        return  # pip would spend a minute finding out nothing changed (longer without a registry)
    sh(BIN / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f".{extra}")
    (VENV / ".smtpproxy-installed").write_text(stamp(extra))


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("run", "test"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        if argv[0] == "run":
            ensure_venv("")
            os.execv(str(BIN / "smtpproxy"), [str(BIN / "smtpproxy"), "serve", *argv[1:]])
        ensure_venv("[test]")
        sh(BIN / "ruff", "check", "smtpproxy", "tests", "bench", "dev.py")
        sh(BIN / "ruff", "format", "--check", "smtpproxy", "tests", "bench", "dev.py")
        sh(BIN / "mypy", "smtpproxy")
        sh(BIN / "python", "-m", "pytest", "-q", *argv[1:])
    except subprocess.CalledProcessError as err:
        return err.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
