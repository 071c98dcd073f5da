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

The top-level ``Config`` lives here; its sections by area in ``sections``
(serving), ``auth`` (SPF, DKIM, ARC, DMARC), ``ratelimits`` and ``submission``; ``base`` has
the error type and the section base class.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import AfterValidator, Field, ValidationError, field_validator, model_validator

from smtpproxy.addresses import HostPort, parse_hostport
from smtpproxy.config.auth import ArcConfig, DkimConfig, DmarcConfig, SpfConfig
from smtpproxy.config.base import CidrList, ConfigError, DomainList, PositiveFloat, Section
from smtpproxy.config.paths import DEFAULT_MAILDIR, MAILDIR, PACKAGED_RULES, check_paths, resolved_settings
from smtpproxy.config.ratelimits import (
    ClientNetPrefix,
    RateLimitConfig,
    RateLimitList,
    SessionLimitsConfig,
    valid_store,
)
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


class Config(Section):
    """The whole configuration of one proxy instance."""

    listen: str = "127.0.0.1:2525"
    hostname: str = "localhost"
    backend: str = DEFAULT_MAILDIR
    backend_options: BackendOptions = BackendOptions()
    metrics: str | None = "127.0.0.1:9125"
    # The same as without a config file: a file names only what it changes.
    relay_domains: DomainList = ["example.org", "localhost"]
    # Postfix's mynetworks: clients that may relay to any domain. An accept rule
    # (a trusted-networks list) does not give relay permission; only this does.
    relay_networks: CidrList = []
    dns: DnsConfig = DnsConfig()
    spf: SpfConfig = SpfConfig()
    dkim: DkimConfig = DkimConfig()
    arc: ArcConfig = ArcConfig()
    dmarc: DmarcConfig = DmarcConfig()
    # The rules folder (default: the rules shipped in the package, see `smtpproxy rules path`);
    # null: no rules on purpose (a folder that does not exist is an error).
    rules: Path | None = PACKAGED_RULES
    rules_options: RulesOptionsConfig = RulesOptionsConfig()
    scores: ScoresConfig = ScoresConfig()
    limits: LimitsConfig = LimitsConfig()
    tls: TlsConfig = TlsConfig()
    proxy_protocol: ProxyProtocolConfig = ProxyProtocolConfig()
    log: LogConfig = LogConfig()
    shutdown_grace: Annotated[float, Field(ge=0)] = 30.0
    # Serving processes sharing the listening port (SO_REUSEPORT); metrics of
    # all of them are aggregated on the one metrics port.
    workers: Annotated[int, Field(ge=1, le=256)] = 1
    check_timeout: PositiveFloat = 20.0
    # What a check that raises or times out turns into: a tempfail (451 4.3.0,
    # the sender retries) or nothing (the check is skipped, logged, counted).
    on_check_error: Literal["tempfail", "continue"] = "tempfail"
    # Rate limits (smtpproxy.ratelimit): the limits, where their state lives,
    # and what a store failure means (open: allow and count; closed: 4xx).
    ratelimits: RateLimitList = []
    ratelimit_store: Annotated[str, AfterValidator(valid_store)] = "memory"
    ratelimit_store_timeout: PositiveFloat = 0.25
    ratelimit_fail: Literal["open", "closed"] = "open"
    ratelimit_exempt: CidrList = []
    ratelimit_memory_max_keys: Annotated[int, Field(ge=1024)] = 1_000_000
    ratelimit_concurrency_ttl: Annotated[float, Field(ge=10)] = 900.0
    session_limits: SessionLimitsConfig = SessionLimitsConfig()
    # Submission (RFC 6409): off unless the section is written.
    submission: SubmissionConfig | None = None
    # Outbound DKIM signing keys; used for authenticated submission only.
    dkim_sign: list[DkimSignKey] = []
    # Resolved location of the config file's folder; not a key users write.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @model_validator(mode="after")
    def _submission_needs_tls(self) -> Config:
        # Passwords never travel in the clear: AUTH only after STARTTLS, and 465 is TLS throughout.
        if self.submission is not None and not self.tls.enabled:
            raise ValueError(
                "submission: expected tls.cert and tls.key to be set (AUTH is offered only over TLS), got tls.cert: null"
            )
        return self

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str) -> str:
        parse_hostport(value)
        return value

    @field_validator("metrics")
    @classmethod
    def _valid_metrics(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
        return value

    @field_validator("hostname")
    @classmethod
    def _valid_hostname(cls, value: str) -> str:
        if not value or any(c.isspace() or ord(c) < 33 or ord(c) > 126 for c in value):
            raise ValueError("expected a host name without spaces or control characters")
        return value

    @field_validator("backend")
    @classmethod
    def _valid_backend(cls, value: str) -> str:
        if value.startswith("maildir:"):
            if not value[len("maildir:") :]:
                raise ValueError("expected maildir:PATH with a path")
            return value
        for scheme in ("smtp://", "smtps://"):
            if value.startswith(scheme):
                try:
                    parse_hostport(value[len(scheme) :].rstrip("/"))
                except ValueError:
                    # Quote the whole URL, not only the host:port part that failed.
                    raise ValueError(f"expected {scheme}host:port (port 0..65535), got {value!r}") from None
                return value
        raise ValueError("expected smtp://host:port, smtps://host:port or maildir:PATH")

    @property
    def listen_address(self) -> HostPort:
        """``listen`` parsed."""
        return parse_hostport(self.listen)

    @property
    def metrics_address(self) -> HostPort | None:
        """``metrics`` parsed; None when metrics are disabled."""
        return parse_hostport(self.metrics) if self.metrics else None

    def path(self, value: Path | str) -> Path:
        """Resolve a path from the config against the config file's folder."""
        p = Path(value)
        return p if p.is_absolute() else (self.base_dir / p)

    @property
    def maildir_path(self) -> Path | None:
        """The maildir backend folder, resolved; None for an SMTP backend."""
        if self.backend.startswith("maildir:"):
            return self.path(self.backend[len("maildir:") :])
        return None

    @property
    def rules_path(self) -> Path | None:
        """The rules folder, resolved; None for ``rules: null`` (no rules)."""
        return None if self.rules is None else self.path(self.rules)


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
