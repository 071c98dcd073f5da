"""The sections of the configuration about serving: limits, TLS, DNS, PROXY, backend, logs, rules."""

from __future__ import annotations

import ipaddress
import itertools
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from smtpproxy.addresses import parse_hostport
from smtpproxy.config.base import CidrList, PositiveFloat, PositiveInt, Section


class LimitsConfig(Section):
    """Per-message and per-connection limits of the inbound server."""

    max_message_size: PositiveInt = 26_214_400
    max_recipients: PositiveInt = 100
    max_messages_per_connection: PositiveInt = 100
    idle_timeout: PositiveFloat = 300.0
    max_connections: PositiveInt = 1000
    # Connections at once from one client address (the PROXY header's when one
    # is used): 421 4.7.0 at connect past it. 50 is Postfix's
    # smtpd_client_connection_count_limit: a Postfix sender opens at most 20 at
    # once to one destination (default_destination_concurrency_limit), which
    # leaves room for a few senders behind one NAT address, while one address
    # can hold at most 5% of the default max_connections. Built on the
    # ratelimits concurrency mechanism (and its store); null or 0 turns it off.
    max_connections_per_ip: Annotated[int, Field(ge=0)] | None = 50
    # Message bytes in flight, all connections together: past it DATA gets
    # 452 4.3.1 (see smtpproxy.inflight). null: an eighth of physical memory,
    # at least 256 MB.
    max_inflight_bytes: PositiveInt | None = None
    max_line_length: Annotated[int, Field(ge=1001, le=1_048_576)] = 8192
    # What happens to the transaction after max_messages_per_connection:
    # "disconnect" answers 421 4.7.0 and closes, "tempfail" answers 450 4.7.1.
    messages_per_connection_action: Literal["disconnect", "tempfail"] = "disconnect"


class TlsConfig(Section):
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


class DnsConfig(Section):
    """The one resolver shared by every check."""

    nameservers: list[str] | None = None  # None: the system's resolv.conf
    timeout: PositiveFloat = 2.0
    cache_size: PositiveInt = 10_000
    reverse_lookup: bool = True

    @field_validator("nameservers")
    @classmethod
    def _valid_nameservers(cls, value: list[str] | None) -> list[str] | None:
        # Addresses only: a host name here would need a resolver to find the
        # resolver, and every lookup (so every message) would fail with 451.
        if value is not None and not value:
            raise ValueError("expected at least one nameserver (or null for the system's resolv.conf)")
        bad = []
        for item in value or []:
            try:
                ipaddress.ip_address(parse_hostport(item, default_port=53).host)
            except ValueError:
                bad.append(repr(item))
        if bad:
            raise ValueError(
                f"expected nameserver IP addresses (IP, IP:port or [IPv6]:port), got {', '.join(bad)}"
            )
        return value


class ProxyProtocolConfig(Section):
    """PROXY protocol (v1/v2), accepted only from trusted networks (HAProxy, a load balancer)."""

    trusted_networks: CidrList = []
    timeout: PositiveFloat = 5.0


class BackendOptions(Section):
    """How to talk to the backend."""

    connect_timeout: PositiveFloat = 10.0
    command_timeout: PositiveFloat = 60.0
    data_timeout: PositiveFloat = 300.0
    tls_verify: bool = True
    starttls: bool = True  # use STARTTLS when the backend offers it
    # Refuse (451 4.3.0) rather than send without TLS: STARTTLS missing from the
    # backend's EHLO (stripped on the path), a failed handshake, no smtps://.
    require_tls: bool = False
    pool_size: PositiveInt = 64  # most connections kept open at once
    pool_idle_timeout: PositiveFloat = 30.0
    forward_client: Literal["none", "xclient", "xforward"] = "none"
    helo_name: str | None = None  # default: hostname


class LogConfig(Section):
    """Logging: one JSON (or text) line per transaction and connection."""

    format: Literal["json", "text"] = "json"
    level: Literal["debug", "info", "warning", "error"] = "info"


class ScoresConfig(Section):
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
            try:
                parse_hostport(value[len("smtp://") :].rstrip("/"))
            except ValueError:
                raise ValueError(f"expected smtp://host:port (port 0..65535), got {value!r}") from None
            return value
        raise ValueError("expected maildir:PATH or smtp://host:port")

    @model_validator(mode="after")
    def _ordered(self) -> ScoresConfig:
        steps = [(k, getattr(self, k)) for k in ("add_header", "quarantine", "tempfail", "reject")]
        present = [(k, v) for k, v in steps if v is not None]
        for (k1, v1), (k2, v2) in itertools.pairwise(present):
            if v1 > v2:
                raise ValueError(f"expected {k1} <= {k2}, got {k1} {v1} > {k2} {v2}")
        return self


class RulesOptionsConfig(Section):
    """How the rules folder is watched for changes (SIGHUP reloads too)."""

    reload_interval: Annotated[float, Field(ge=0)] = 5.0  # seconds between mtime polls; 0 disables
