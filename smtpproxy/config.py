"""The configuration: one typed, validated model and the one place for every default.

``load_config(path)`` reads YAML, validates every key and raises ``ConfigError``
listing every problem as ``key.path: expected ..., got ...``. Relative paths
resolve against the folder of the config file (the current folder for the
embedded defaults).
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from smtpproxy.addresses import HostPort, parse_hostport


class ConfigError(Exception):
    """The configuration is unusable; ``problems`` holds one line per key."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))

    def render(self) -> str:
        """Text for the operator: the file, then one problem per line."""
        lines = [f"error: invalid configuration in {self.source}:"]
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False, validate_default=True)


PositiveInt = Annotated[int, Field(ge=1)]
PositiveFloat = Annotated[float, Field(gt=0)]


class LimitsConfig(_Model):
    """Per-message and per-connection limits of the inbound server."""

    max_message_size: PositiveInt = 26_214_400
    max_recipients: PositiveInt = 100
    max_messages_per_connection: PositiveInt = 100
    idle_timeout: PositiveFloat = 300.0
    max_connections: PositiveInt = 1000
    max_line_length: Annotated[int, Field(ge=1001, le=1_048_576)] = 8192
    # What happens to the transaction after max_messages_per_connection:
    # "disconnect" answers 421 4.7.0 and closes, "tempfail" answers 450 4.7.1.
    messages_per_connection_action: Literal["disconnect", "tempfail"] = "disconnect"


class TlsConfig(_Model):
    """Inbound TLS: STARTTLS is offered when both cert and key are set."""

    cert: Path | None = None
    key: Path | None = None
    min_version: Literal["TLSv1.2", "TLSv1.3"] = "TLSv1.2"

    @model_validator(mode="after")
    def _both_or_neither(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("cert and key must be set together")
        return self

    @property
    def enabled(self) -> bool:
        """True when STARTTLS is offered."""
        return self.cert is not None


class DnsConfig(_Model):
    """The one resolver shared by every check."""

    nameservers: list[str] | None = None  # None: the system's resolv.conf
    timeout: PositiveFloat = 2.0
    cache_size: PositiveInt = 10_000
    reverse_lookup: bool = True

    @field_validator("nameservers")
    @classmethod
    def _valid_nameservers(cls, value: list[str] | None) -> list[str] | None:
        for item in value or []:
            parse_hostport(item, default_port=53)
        return value


class ProxyProtocolConfig(_Model):
    """PROXY protocol (v1/v2), accepted only from trusted networks (HAProxy, a load balancer)."""

    trusted_networks: list[str] = []
    timeout: PositiveFloat = 5.0

    @field_validator("trusted_networks")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            ipaddress.ip_network(item, strict=False)
        return value


class BackendOptions(_Model):
    """How to talk to the backend."""

    connect_timeout: PositiveFloat = 10.0
    command_timeout: PositiveFloat = 60.0
    data_timeout: PositiveFloat = 300.0
    tls_verify: bool = True
    starttls: bool = True  # use STARTTLS when the backend offers it
    pool_size: PositiveInt = 64  # most connections kept open at once
    pool_idle_timeout: PositiveFloat = 30.0
    forward_client: Literal["none", "xclient", "xforward"] = "none"
    helo_name: str | None = None  # default: hostname


class LogConfig(_Model):
    """Logging: one JSON (or text) line per transaction and connection."""

    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class Config(_Model):
    """The whole configuration of one proxy instance."""

    listen: str = "127.0.0.1:2525"
    hostname: str = "localhost"
    backend: str = "maildir:./var/mail"
    backend_options: BackendOptions = BackendOptions()
    metrics: str | None = "127.0.0.1:9125"
    relay_domains: list[str] = []
    dns: DnsConfig = DnsConfig()
    rules: Path = Path("rules")
    limits: LimitsConfig = LimitsConfig()
    tls: TlsConfig = TlsConfig()
    proxy_protocol: ProxyProtocolConfig = ProxyProtocolConfig()
    log: LogConfig = LogConfig()
    shutdown_grace: Annotated[float, Field(ge=0)] = 30.0
    check_timeout: PositiveFloat = 20.0
    # What a check that raises or times out turns into: a tempfail (451 4.3.0,
    # the sender retries) or nothing (the check is skipped, logged, counted).
    on_check_error: Literal["tempfail", "continue"] = "tempfail"
    # Resolved location of the config file's folder; not a key users write.
    base_dir: Path = Field(default=Path("."), exclude=True)

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

    @field_validator("relay_domains")
    @classmethod
    def _lower_domains(cls, value: list[str]) -> list[str]:
        out = []
        for domain in value:
            d = domain.strip().lower().rstrip(".")
            if not d or " " in d:
                raise ValueError(f"expected domain names, got {domain!r}")
            out.append(d)
        return out

    @field_validator("backend")
    @classmethod
    def _valid_backend(cls, value: str) -> str:
        if value.startswith("maildir:"):
            if not value[len("maildir:") :]:
                raise ValueError("expected maildir:PATH with a path")
            return value
        for scheme in ("smtp://", "smtps://"):
            if value.startswith(scheme):
                parse_hostport(value[len(scheme) :].rstrip("/"))
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
    def rules_path(self) -> Path:
        """The rules folder, resolved."""
        return self.path(self.rules)


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


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
        problems.append(f"{loc}: {msg}, got {_describe(e.get('input'))}")
    return problems


def build_config(data: dict[str, Any], *, source: str = "<defaults>", base_dir: Path | None = None) -> Config:
    """Validate a mapping into a Config, or raise ConfigError naming every bad key."""
    if not isinstance(data, dict):
        raise ConfigError(source, [f"(top level): expected a mapping of keys, got {_describe(data)}"])
    try:
        return Config.model_validate({**data, "base_dir": base_dir or Path.cwd()})
    except ValidationError as err:
        raise ConfigError(source, _format_errors(err)) from None


# What `smtpproxy serve` runs on without --config: a newcomer's first look.
# Mail for example.org and localhost flows into ./var/mail (a Maildir).
EMBEDDED_DEFAULTS: dict[str, Any] = {
    "listen": "127.0.0.1:2525",
    "hostname": "localhost",
    "backend": "maildir:./var/mail",
    "metrics": "127.0.0.1:9125",
    "relay_domains": ["example.org", "localhost"],
    "rules": "rules",
}


def load_config(path: str | Path | None) -> Config:
    """Load and validate the YAML file at ``path``; None gives the embedded defaults."""
    if path is None:
        return build_config(EMBEDDED_DEFAULTS, source="<embedded defaults>")
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
