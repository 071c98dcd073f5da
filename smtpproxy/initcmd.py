"""``smtpproxy init DIR``: a config folder an operator edits, written once, never overwritten.

DIR gets ``smtpproxy.yaml`` (every key commented with its default, generated
from the model), ``rules/`` (a copy of the packaged rules and lists, to edit)
and ``smtpproxy.service.d/config.conf``, a systemd drop-in that runs this
installation's ``smtpproxy`` on this folder's config.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from smtpproxy.config import PACKAGED_RULES, Config
from smtpproxy.config.sample import sample_config

CONFIG_NAME = "smtpproxy.yaml"
DROPIN = Path("smtpproxy.service.d") / "config.conf"


class InitError(Exception):
    """The folder cannot be initialised (something would be overwritten, or it is not writable)."""


def _executable() -> str:
    """This installation's console script, absolute (systemd wants one)."""
    here = Path(sys.executable).parent / "smtpproxy"
    found = here if here.exists() else shutil.which("smtpproxy")
    return str(found or "/opt/smtpproxy/bin/smtpproxy")


def dropin(config_file: Path) -> str:
    """The systemd drop-in text for ``config_file``."""
    return (
        "# systemd drop-in written by `smtpproxy init`: this installation's smtpproxy on this config.\n"
        "# Install: cp -r smtpproxy.service.d /etc/systemd/system/ && systemctl daemon-reload\n"
        "[Service]\n"
        "ExecStart=\n"
        f"ExecStart={_executable()} serve --config {config_file}\n"
    )


def init(folder: Path) -> list[Path]:
    """Write the config, the rules folder and the drop-in into ``folder``; the paths written.

    Refuses (InitError, nothing written) when any of them exists already.
    """
    folder = folder.resolve()
    targets = [folder / CONFIG_NAME, folder / "rules", folder / DROPIN]
    existing = [str(p) for p in targets if p.exists()]
    if existing:
        raise InitError(f"refusing to overwrite {', '.join(existing)}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copytree(PACKAGED_RULES, folder / "rules")
        (folder / CONFIG_NAME).write_text(sample_config(Config()), encoding="utf-8")
        (folder / DROPIN).parent.mkdir(exist_ok=True)
        (folder / DROPIN).write_text(dropin(folder / CONFIG_NAME), encoding="utf-8")
    except OSError as err:
        raise InitError(f"cannot write into {folder}: {err.strerror or err}") from None
    return targets
