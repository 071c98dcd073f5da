"""The sections of the configuration about rate limits and per-connection limits."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, AliasChoices, Field, field_validator, model_validator

from smtpproxy.config.base import CidrList, PositiveFloat, PositiveInt, Section
from smtpproxy.ratelimit.gcra import Rate, parse_rate
from smtpproxy.ratelimit.keys import CONNECTION_KINDS, FIELD_NAMES, KEY_KINDS, earliest_stage, key_problem
from smtpproxy.ratelimit.store import REDIS_SCHEMES


class ClientNetPrefix(Section):
    """Prefix lengths of the ``client_net`` rate-limit key."""

    ipv4: Annotated[int, Field(ge=8, le=32)] = 24
    ipv6: Annotated[int, Field(ge=16, le=128)] = 64


class RateLimitConfig(Section):
    """One entry of ``ratelimits``: a keyed rate (GCRA with burst) or a concurrency limit.

    ``key`` is one kind or a list of kinds (``[client_ip, sender_domain]``, or
    as rule fields ``[client.ip, mail_from.domain]``; ``"client_ip+sender_domain"``
    is accepted as shorthand). ``burst``
    defaults to the rate's count. ``on`` defaults to the first stage where the
    key is known. A concurrency limit (``concurrency: N``) is held from connect
    to disconnect and keys on client_ip or client_net only.
    """

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    key: list[str]
    rate: str | None = None
    burst: PositiveInt | None = None
    # ``stage:`` as in rules, or ``on:`` as written before.
    on: Literal["connect", "helo", "mail", "rcpt", "data"] | None = Field(
        default=None, validation_alias=AliasChoices("on", "stage")
    )
    concurrency: PositiveInt | None = None
    exempt: CidrList = []
    client_net_prefix: ClientNetPrefix = ClientNetPrefix()

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, data: Any) -> Any:
        # YAML 1.1 (PyYAML) reads an unquoted `on:` key as the boolean True.
        if isinstance(data, dict) and True in data and "on" not in data:
            data = {("on" if k is True else k): v for k, v in data.items()}
        return data

    @field_validator("key", mode="before")
    @classmethod
    def _split_key(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [part.strip() for part in value.split("+")]
        if isinstance(value, list):
            return [FIELD_NAMES.get(part, part) if isinstance(part, str) else part for part in value]
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


def valid_store(value: str) -> str:
    if value == "memory" or value.startswith(REDIS_SCHEMES):
        return value
    raise ValueError(f"expected memory or a URL starting with {', '.join(REDIS_SCHEMES)}")


RateLimitList = Annotated[list[RateLimitConfig], AfterValidator(_unique_names)]


class SessionLimitsConfig(Section):
    """Per-connection limits (null: unlimited); each answers 421 and closes when exceeded.

    max_transactions: MAIL commands per connection (421 4.7.0).
    max_invalid_commands: unknown or malformed commands (421 4.7.0).
    max_rejected_recipients: RCPTs refused (a dictionary attack; 421 4.7.0).
    max_errors: every error above plus any other error reply (421 4.7.0).
    max_duration: seconds since connect (421 4.4.2).
    max_junk_commands: NOOP, RSET, VRFY, EXPN, HELP and repeated HELO/EHLO
    (Postfix's smtpd_junk_command_limit; 421 4.7.0); the count starts again
    when a message is delivered.
    tarpit_delay: seconds to wait before answering, per error so far (0: off),
    growing linearly with the errors up to tarpit_max.
    """

    max_transactions: PositiveInt | None = None
    max_invalid_commands: PositiveInt | None = 10
    max_rejected_recipients: PositiveInt | None = 20
    max_errors: PositiveInt | None = 50
    max_duration: PositiveFloat | None = 3600.0
    max_junk_commands: PositiveInt | None = 100
    tarpit_delay: Annotated[float, Field(ge=0, le=60)] = 0.0
    tarpit_max: Annotated[float, Field(ge=0, le=300)] = 10.0
