"""The configuration: one typed, validated model and the one place for every default.

``load_config(path)`` reads YAML, validates every key and raises ``ConfigError``
listing every problem as ``key.path: expected ..., got ...``. Relative paths
resolve against the folder of the config file (the current folder for the
embedded defaults).
"""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from smtpproxy.addresses import HostPort, parse_hostport
from smtpproxy.ratelimit.gcra import Rate, parse_rate
from smtpproxy.ratelimit.keys import CONNECTION_KINDS, KEY_KINDS, earliest_stage, key_problem
from smtpproxy.ratelimit.store import REDIS_SCHEMES


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


class SpfConfig(_Model):
    """SPF (RFC 7208) at MAIL FROM; by default the decision is left to DMARC."""

    enabled: bool = True
    reject_on_fail: bool = False  # 550 5.7.23 on "fail" without waiting for DMARC
    helo_check: bool = True  # check the HELO identity when MAIL FROM is <>
    tempfail_on_temperror: bool = False  # 451 4.4.3 when DNS fails during SPF
    timeout: PositiveFloat = 15.0  # whole evaluation; keep below check_timeout


class DkimConfig(_Model):
    """DKIM verification (RFC 6376) of every signature, topmost first."""

    enabled: bool = True
    max_signatures: Annotated[int, Field(ge=1, le=50)] = 5  # more are ignored (CPU bound per message)
    min_key_bits: Annotated[int, Field(ge=512, le=8192)] = 1024  # smaller RSA keys -> dkim=policy (RFC 8301)


class ArcConfig(_Model):
    """ARC chain validation (RFC 8617): recorded for rules and for dmarc.trusted_arc_sealers."""

    enabled: bool = True


class DmarcConfig(_Model):
    """DMARC (RFC 7489) evaluation and enforcement at end of DATA.

    ``enforce``: apply the domain's p=reject (550 5.7.1) and p=quarantine.
    ``temperror_action``: a DNS failure during DMARC answers 451 4.4.3 ("tempfail") or passes ("accept").
    ``report_only``: record results and add headers, never reject, quarantine or tempfail.
    ``trusted_arc_sealers``: a DMARC failure is not enforced when the ARC chain passes and its
    newest seal is by one of these domains (forwarders and mailing lists you trust).
    """

    enabled: bool = True
    enforce: bool = True
    temperror_action: Literal["tempfail", "accept"] = "tempfail"
    report_only: bool = False
    quarantine_header: str = "X-Quarantine"
    trusted_arc_sealers: list[str] = []

    @field_validator("quarantine_header")
    @classmethod
    def _valid_header_name(cls, value: str) -> str:
        if not value or not all(33 <= ord(c) <= 126 and c != ":" for c in value):
            raise ValueError("expected a header field name (printable ASCII, no colon or spaces)")
        return value

    @field_validator("trusted_arc_sealers")
    @classmethod
    def _lower_sealers(cls, value: list[str]) -> list[str]:
        out = []
        for domain in value:
            d = domain.strip().lower().rstrip(".")
            if not d or any(c.isspace() for c in d):
                raise ValueError(f"expected domain names, got {domain!r}")
            out.append(d)
        return out


class ClientNetPrefix(_Model):
    """Prefix lengths of the ``client_net`` rate-limit key."""

    ipv4: Annotated[int, Field(ge=8, le=32)] = 24
    ipv6: Annotated[int, Field(ge=16, le=128)] = 64


def _valid_cidrs(value: list[str]) -> list[str]:
    for item in value:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ValueError(f"expected CIDR networks like 10.0.0.0/8, not {item!r}") from None
    return value


CidrList = Annotated[list[str], AfterValidator(_valid_cidrs)]


class RateLimitConfig(_Model):
    """One entry of ``ratelimits``: a keyed rate (GCRA with burst) or a concurrency limit.

    ``key`` is one kind or a list of kinds (``[client_ip, sender_domain]``;
    ``"client_ip+sender_domain"`` is accepted as shorthand). ``burst``
    defaults to the rate's count. ``on`` defaults to the first stage where the
    key is known. A concurrency limit (``concurrency: N``) is held from connect
    to disconnect and keys on client_ip or client_net only.
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    key: list[str]
    rate: str | None = None
    burst: PositiveInt | None = None
    on: Literal["connect", "helo", "mail", "rcpt", "data"] | None = None
    concurrency: PositiveInt | None = None
    exempt: CidrList = []
    client_net_prefix: ClientNetPrefix = ClientNetPrefix()

    @field_validator("key", mode="before")
    @classmethod
    def _split_key(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split("+")]
        return value

    @field_validator("key")
    @classmethod
    def _known_kinds(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(f"expected one or more of {', '.join(KEY_KINDS)}")
        for kind in value:
            if kind not in KEY_KINDS:
                raise ValueError(f"expected key kinds among {', '.join(KEY_KINDS)}, got {kind!r}")
        if len(set(value)) != len(value):
            raise ValueError("key kinds must not repeat")
        return value

    @field_validator("rate")
    @classmethod
    def _valid_rate(cls, value: str | None) -> str | None:
        if value is not None:
            parse_rate(value)
        return value

    @model_validator(mode="after")
    def _rate_or_concurrency(self) -> RateLimitConfig:
        kinds = tuple(self.key)
        if (self.rate is None) == (self.concurrency is None):
            raise ValueError(f"limit {self.name}: expected either rate: N/unit or concurrency: N")
        if self.concurrency is not None:
            if self.burst is not None or self.on not in (None, "connect"):
                raise ValueError(f"limit {self.name}: a concurrency limit takes no burst and no on")
            if not CONNECTION_KINDS.issuperset(kinds):
                raise ValueError(f"limit {self.name}: a concurrency limit keys on client_ip or client_net")
            return self
        problem = key_problem(kinds, self.stage)
        if problem:
            raise ValueError(f"limit {self.name}: {problem}")
        return self

    @property
    def stage(self) -> str:
        """The stage the limit counts at (``on``, or the first stage where its key is known)."""
        if self.concurrency is not None:
            return "connect"
        return self.on or earliest_stage(tuple(self.key))

    @property
    def parsed_rate(self) -> Rate | None:
        """``rate`` parsed; None for a concurrency limit."""
        return parse_rate(self.rate) if self.rate is not None else None

    @property
    def effective_burst(self) -> int:
        """``burst``, or the rate's count when unset (see ``Rate.default_burst``)."""
        rate = self.parsed_rate
        if self.burst is not None:
            return self.burst
        return rate.default_burst() if rate is not None else 1


def _unique_names(value: list[RateLimitConfig]) -> list[RateLimitConfig]:
    names = [item.name for item in value]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValueError(f"limit names must be unique, repeated: {', '.join(dupes)}")
    return value


def _valid_store(value: str) -> str:
    if value == "memory" or value.startswith(REDIS_SCHEMES):
        return value
    raise ValueError(f"expected memory or a URL starting with {', '.join(REDIS_SCHEMES)}")


RateLimitList = Annotated[list[RateLimitConfig], AfterValidator(_unique_names)]


class SessionLimitsConfig(_Model):
    """Per-connection limits (null: unlimited); each answers 421 and closes when exceeded.

    max_transactions: MAIL commands per connection (421 4.7.0).
    max_invalid_commands: unknown or malformed commands (421 4.7.0).
    max_rejected_recipients: RCPTs refused (a dictionary attack; 421 4.7.0).
    max_errors: every error above plus any other error reply (421 4.7.0).
    max_duration: seconds since connect (421 4.4.2).
    tarpit_delay: seconds to wait before answering, per error so far (0: off),
    growing linearly with the errors up to tarpit_max.
    """

    max_transactions: PositiveInt | None = None
    max_invalid_commands: PositiveInt | None = 10
    max_rejected_recipients: PositiveInt | None = 20
    max_errors: PositiveInt | None = 50
    max_duration: PositiveFloat | None = 3600.0
    tarpit_delay: Annotated[float, Field(ge=0, le=60)] = 0.0
    tarpit_max: Annotated[float, Field(ge=0, le=300)] = 10.0


class ScoresConfig(_Model):
    """Score thresholds of the rules (rspamd-style actions); null disables a threshold.

    At ``add_header`` and above the message gets ``X-Spam-Flag: YES`` and
    ``X-Spam-Score``; at ``reject`` it is refused with 550 5.7.1; ``tempfail``
    answers 451 4.7.1; ``quarantine`` quarantines (to ``quarantine_to`` when set).
    """

    add_header: float | None = 5.0
    quarantine: float | None = None
    tempfail: float | None = None
    reject: float | None = 15.0
    quarantine_to: str | None = None  # maildir:PATH or smtp://host:port; None: deliver marked

    @field_validator("quarantine_to")
    @classmethod
    def _valid_destination(cls, value: str | None) -> str | None:
        if value is None or (value.startswith("maildir:") and len(value) > len("maildir:")):
            return value
        if value.startswith("smtp://"):
            parse_hostport(value[len("smtp://") :].rstrip("/"))
            return value
        raise ValueError("expected maildir:PATH or smtp://host:port")

    @model_validator(mode="after")
    def _ordered(self) -> ScoresConfig:
        steps = [(k, getattr(self, k)) for k in ("add_header", "quarantine", "tempfail", "reject")]
        present = [(k, v) for k, v in steps if v is not None]
        for (k1, v1), (k2, v2) in itertools.pairwise(present):
            if v1 > v2:
                raise ValueError(f"expected {k1} ({v1}) <= {k2} ({v2})")
        return self


class RulesOptionsConfig(_Model):
    """How the rules folder is watched for changes (SIGHUP reloads too)."""

    reload_interval: Annotated[float, Field(ge=0)] = 5.0  # seconds between mtime polls; 0 disables


class Config(_Model):
    """The whole configuration of one proxy instance."""

    listen: str = "127.0.0.1:2525"
    hostname: str = "localhost"
    backend: str = "maildir:./var/mail"
    backend_options: BackendOptions = BackendOptions()
    metrics: str | None = "127.0.0.1:9125"
    relay_domains: list[str] = []
    dns: DnsConfig = DnsConfig()
    spf: SpfConfig = SpfConfig()
    dkim: DkimConfig = DkimConfig()
    arc: ArcConfig = ArcConfig()
    dmarc: DmarcConfig = DmarcConfig()
    rules: Path = Path("rules")
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
    ratelimit_store: Annotated[str, AfterValidator(_valid_store)] = "memory"
    ratelimit_store_timeout: PositiveFloat = 0.25
    ratelimit_fail: Literal["open", "closed"] = "open"
    ratelimit_exempt: CidrList = []
    ratelimit_memory_max_keys: Annotated[int, Field(ge=1024)] = 1_000_000
    ratelimit_concurrency_ttl: Annotated[float, Field(ge=10)] = 900.0
    session_limits: SessionLimitsConfig = SessionLimitsConfig()
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
