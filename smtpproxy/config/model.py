"""The top-level ``Config`` model: every key and its default (the sections live beside it).

Apart from ``config/__init__`` (loading, error reports) so that ``paths``, which
checks the files a Config names, can use it without an import circle.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from smtpproxy.addresses import HostPort, parse_hostport
from smtpproxy.config.auth import ArcConfig, DkimConfig, DmarcConfig, SpfConfig
from smtpproxy.config.base import (
    DEFAULT_MAILDIR,
    PACKAGED_RULES,
    CidrList,
    DomainList,
    PositiveFloat,
    Section,
)
from smtpproxy.config.milter import MilterConfig
from smtpproxy.config.ratelimits import RateLimitList, SessionLimitsConfig, valid_store
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


class Config(Section):
    """The whole configuration of one proxy instance."""

    # null: no SMTP listener (milter mode only, with milter.listen).
    listen: str | None = "127.0.0.1:2525"
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
    # The same policy served to an MTA over the milter protocol (smtpproxy.milter).
    milter: MilterConfig = MilterConfig()
    # Submission (RFC 6409): off unless the section is written.
    submission: SubmissionConfig | None = None
    # Outbound DKIM signing keys; used for authenticated submission only.
    dkim_sign: list[DkimSignKey] = []
    # Resolved location of the config file's folder; not a key users write.
    base_dir: Path = Field(default=Path("."), exclude=True)

    @field_validator("listen")
    @classmethod
    def _valid_listen(cls, value: str | None) -> str | None:
        if value is not None:
            parse_hostport(value)
        return value

    @model_validator(mode="after")
    def _serves_something(self) -> Config:
        if self.listen is None and self.milter.listen is None:
            raise ValueError("listen: expected host:port, or null only with milter.listen set, got null")
        if self.milter.listen is not None and self.workers > 1:
            # The supervisor shares one SMTP port between processes; not the milter's.
            raise ValueError(f"milter.listen: expected workers: 1 with a milter, got workers: {self.workers}")
        return self

    @model_validator(mode="after")
    def _submission_needs_tls(self) -> Config:
        # Passwords never travel in the clear: AUTH only after STARTTLS, and 465 is TLS throughout.
        if self.submission is not None and not self.tls.enabled:
            raise ValueError(
                "submission: expected tls.cert and tls.key to be set (AUTH is offered only over TLS), got tls.cert: null"
            )
        return self

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
    def max_messages_per_connection(self) -> int:
        """The one messages-per-connection limit.

        ``session_limits.max_transactions`` is an older spelling of
        ``limits.max_messages_per_connection``: when both are set the lower wins.
        """
        old = self.session_limits.max_transactions
        limit = self.limits.max_messages_per_connection
        return limit if old is None else min(limit, old)

    @property
    def spelling_notes(self) -> list[str]:
        """Keys written in an older spelling, to say so at start."""
        if self.session_limits.max_transactions is None:
            return []
        return [
            "session_limits.max_transactions is an older spelling of limits.max_messages_per_connection "
            f"(in force: {self.max_messages_per_connection})"
        ]

    @property
    def listen_address(self) -> HostPort | None:
        """``listen`` parsed; None without an SMTP listener (milter only)."""
        return None if self.listen is None else parse_hostport(self.listen)

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
