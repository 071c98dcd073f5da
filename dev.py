#!/usr/bin/env python3
"""Two commands for a fresh machine with only Python 3.11+ and pip.

    python3 dev.py run     create .venv, install smtpproxy, serve on the embedded defaults
    python3 dev.py test    create .venv, install smtpproxy with test tools, lint, type-check, run every test

Extra arguments after ``run`` go to ``smtpproxy serve`` (e.g. ``--config smtpproxy.yaml``);
after ``test`` they go to pytest.
"""

from __future__ import annotations

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


def ensure_venv(extra: str) -> None:
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    sh(BIN / "python", "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-e", f".{extra}")


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
