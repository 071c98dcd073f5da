"""Checks of the files and folders a configuration names, done when it is loaded.

A path that does not exist must stop the start with the key and the path, not
switch protection off (a missing rules folder would mean no filtering) or fail
later with a bare ``[Errno 2]`` (a missing TLS certificate). What each key needs:

- ``rules``: an existing folder (``rules: null`` says "no rules" on purpose);
- ``tls.cert``/``tls.key``: readable files that load together as a certificate
  chain and its private key;
- a ``maildir:PATH`` (``backend``, ``scores.quarantine_to``): the maildir folder
  itself, or its parent folder, exists. The proxy creates the maildir (and its
  ``tmp``/``new``/``cur``) but never a chain of folders: a mistyped path is an
  error, not a new tree made by root. The default maildir (``./var/mail`` of
  the current folder, used when the config has no ``backend`` key) is exempt:
  it is documented, not a typo, and a first run in a fresh folder creates it.

Keys a config file leaves out keep their defaults *and* resolve as they would
without a file: the default maildir lands in the current folder (the service's
``WorkingDirectory``), not next to the config file (``/etc`` is read-only under
``ProtectSystem=strict``), and the default rules are the packaged ones.
"""

from __future__ import annotations

import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smtpproxy.config.base import MAILDIR

if TYPE_CHECKING:
    from smtpproxy.config.model import Config


def check_paths(config: Config, *, default_maildir: bool = False) -> list[str]:
    """One problem line per path key that cannot work (``key: expected ..., got ...``); [] when all do.

    ``default_maildir``: ``backend`` is the default (not written in the file), exempt from the check.
    """
    problems: list[str] = []
    if config.rules is not None:
        folder = config.path(config.rules)
        if not folder.is_dir():
            what = "a file" if folder.exists() else "no such folder"
            problems.append(
                f"rules: expected an existing folder of rule files (or null for no rules), "
                f"got {str(config.rules)!r} ({what}: {folder})"
            )
    problems += _tls_problems(config)
    if not default_maildir and config.listen is not None:  # milter only (listen: null): no backend
        problems += _maildir_problems("backend", config.backend, config)
    if config.scores.quarantine_to is not None:
        problems += _maildir_problems("scores.quarantine_to", config.scores.quarantine_to, config)
    return problems


def _tls_problems(config: Config) -> list[str]:
    tls = config.tls
    if tls.cert is None or tls.key is None:
        return []
    problems = []
    paths = {"cert": config.path(tls.cert), "key": config.path(tls.key)}
    for key, path in paths.items():
        wanted = "a PEM certificate chain file" if key == "cert" else "a PEM private key file"
        problem = _unreadable(path)
        if problem:
            problems.append(f"tls.{key}: expected {wanted}, got {str(getattr(tls, key))!r} ({problem})")
    if problems:
        return problems
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(
            str(paths["cert"]), str(paths["key"])
        )
    except (ssl.SSLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", None) or str(err)
        return [
            f"tls: expected cert and key files that load as a certificate and its key, "
            f"got {str(tls.cert)!r} and {str(tls.key)!r} ({reason})"
        ]
    return []


def _unreadable(path: Path) -> str:
    """Why ``path`` cannot be read as a file; "" when it can."""
    if not path.exists():
        return f"no such file: {path}"
    if not path.is_file():
        return f"not a file: {path}"
    if not os.access(path, os.R_OK):
        return f"not readable: {path}"
    return ""


def _maildir_problems(key: str, value: str, config: Config) -> list[str]:
    if not value.startswith(MAILDIR):
        return []
    folder = config.path(value[len(MAILDIR) :])
    if folder.is_dir():
        return []
    if folder.exists():
        return [f"{key}: expected maildir:PATH naming a folder, got {value!r} (a file: {folder})"]
    if not folder.parent.is_dir():
        return [
            f"{key}: expected maildir:PATH whose folder or parent folder exists, "
            f"got {value!r} (no such folder: {folder.parent})"
        ]
    return []


def resolved_settings(config: Config) -> dict[str, Any]:
    """The effective settings as JSON-ready data, every path resolved as the proxy will use it."""
    data: dict[str, Any] = config.model_dump(mode="json", exclude={"base_dir"})
    if config.rules_path is not None:
        data["rules"] = str(config.rules_path)
    for key in ("cert", "key"):
        value = getattr(config.tls, key)
        if value is not None:
            data["tls"][key] = str(config.path(value))
    if config.maildir_path is not None:
        data["backend"] = MAILDIR + str(config.maildir_path)
    target = config.scores.quarantine_to
    if target is not None and target.startswith(MAILDIR):
        data["scores"]["quarantine_to"] = MAILDIR + str(config.path(target[len(MAILDIR) :]))
    return data
