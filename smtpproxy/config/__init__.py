"""The configuration: one typed, validated model and the one place for every default.

``load_config(path)`` reads YAML, validates every key and raises ``ConfigError``
listing every problem as ``key.path: expected ..., got ...`` (each line says
"got" once). A file names only what it changes: without a file (``path`` None)
the model's defaults apply, and a file changes exactly the keys it writes.
Relative paths written in a file resolve against its folder; defaults resolve
as without a file (the maildir in the current folder, the packaged rules). The
files and folders they name are checked too (``paths``): a missing rules
folder, TLS file or maildir parent stops the start instead of switching
something off.

The top-level ``Config`` lives in ``model``; its sections by area in ``sections``
(serving), ``auth`` (SPF, DKIM, ARC, DMARC), ``ratelimits`` and ``submission``; ``base`` has
the error type and the section base class.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from smtpproxy.config.auth import ArcConfig, DkimConfig, DmarcConfig, SpfConfig
from smtpproxy.config.base import DEFAULT_MAILDIR, MAILDIR, PACKAGED_RULES, ConfigError
from smtpproxy.config.milter import MilterConfig
from smtpproxy.config.model import Config
from smtpproxy.config.paths import check_paths, resolved_settings
from smtpproxy.config.ratelimits import ClientNetPrefix, RateLimitConfig, SessionLimitsConfig
from smtpproxy.config.sections import (
    BackendOptions,
    DnsConfig,
    LimitsConfig,
    LogConfig,
    ProxyProtocolConfig,
    RulesOptionsConfig,
    ScoresConfig,
    TlsConfig,
)
from smtpproxy.config.submission import DkimSignKey, SubmissionConfig

__all__ = [
    "PACKAGED_RULES",
    "ArcConfig",
    "BackendOptions",
    "ClientNetPrefix",
    "Config",
    "ConfigError",
    "DkimConfig",
    "DkimSignKey",
    "DmarcConfig",
    "DnsConfig",
    "LimitsConfig",
    "LogConfig",
    "MilterConfig",
    "ProxyProtocolConfig",
    "RateLimitConfig",
    "RulesOptionsConfig",
    "ScoresConfig",
    "SessionLimitsConfig",
    "SpfConfig",
    "SubmissionConfig",
    "TlsConfig",
    "build_config",
    "load_config",
    "resolved_settings",
]


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# A message that already quotes what it got (our validators name the bad item of a list).
_SAYS_GOT = re.compile(r"\bgot\b")


def _format_errors(err: ValidationError) -> list[str]:
    problems = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
            problems.append(f"{loc}: {msg}")
            continue
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        msg = msg[0].lower() + msg[1:] if msg else msg
        if not _SAYS_GOT.search(msg):
            msg = f"{msg}, got {_describe(e.get('input'))}"
        if f"{loc}: {msg}" not in problems:  # a union type repeats one complaint per member
            problems.append(f"{loc}: {msg}")
    return problems


def build_config(data: dict[str, Any], *, source: str = "<defaults>", base_dir: Path | None = None) -> Config:
    """Validate a mapping into a Config, or raise ConfigError naming every bad key.

    The files and folders it names are checked as well (``paths.check_paths``).
    Keys left out keep their defaults and resolve as without a file: the
    default maildir is ``./var/mail`` of the current folder, not of ``base_dir``.
    """
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of keys, got {_describe(data)}"])
    default_maildir = "backend" not in data
    if default_maildir:
        data = {**data, "backend": MAILDIR + str(Path.cwd() / DEFAULT_MAILDIR[len(MAILDIR) :])}
    try:
        config = Config.model_validate({**data, "base_dir": base_dir or Path.cwd()})
    except ValidationError as err:
        raise ConfigError(source, _format_errors(err)) from None
    problems = check_paths(config, default_maildir=default_maildir)
    if problems:
        raise ConfigError(source, problems)
    return config


def load_config(path: str | Path | None) -> Config:
    """Load and validate the YAML file at ``path``; None gives the defaults (the same as an empty file)."""
    if path is None:
        return build_config({}, source="<embedded defaults>")
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), ["file not found"]) from None
    except OSError as err:
        raise ConfigError(str(p), [f"cannot read: {err.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(str(p), [f"{where}invalid YAML: {problem}"]) from None
    if data is None:
        data = {}
    return build_config(data, source=str(p), base_dir=p.resolve().parent)
