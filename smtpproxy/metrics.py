"""Every metric of smtpproxy, in one place, on the application's own registry.

Label values always come from small closed sets (actions, stages, result
words, reply classes) or from configured names (rules, rate limits): never a
client address, a sender or a recipient.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from smtpproxy import __version__

# Seconds: SMTP stages are milliseconds on a good day, seconds when DNS or the
# backend is slow; the tail matters for alerting on timeouts.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (1024, 4096, 16384, 65536, 262144, 1048576, 4194304, 10485760, 26214400, 52428800)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900)


class Metrics:
    """The metric objects, registered on ``self.registry``."""

    def __init__(self, registry: CollectorRegistry | None = None, *, process: bool = True) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        r = self.registry
        if process:
            ProcessCollector(registry=r)
            PlatformCollector(registry=r)
        # A gauge rather than an Info: Info is not supported across worker processes.
        self.build_info = Gauge(
            "smtpproxy_build_info", "Version of smtpproxy.", ["version"], registry=r, multiprocess_mode="max"
        )
        self.build_info.labels(__version__).set(1)

        # Connections
        self.connections = Counter(
            "smtpproxy_connections",
            "Client connections accepted, by transport security at close (plain, tls).",
            ["tls"],
            registry=r,
        )
        self.tls_handshake_failures = Counter(
            "smtpproxy_tls_handshake_failures",
            "Inbound STARTTLS handshakes that failed, by reason (protocol_version, "
            "no_shared_cipher, certificate, not_tls, closed, timeout, other).",
            ["reason"],
            registry=r,
        )
        self.connections_rejected = Counter(
            "smtpproxy_connections_rejected",
            "Client connections refused before or at the banner, by reason.",
            ["reason"],
            registry=r,
        )
        self.connections_active = Gauge(
            "smtpproxy_connections_active",
            "Client connections currently open.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.inflight_bytes = Gauge(
            "smtpproxy_inflight_bytes",
            "Message bytes held in memory by transactions in progress (budget: limits.max_inflight_bytes).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.connection_duration = Histogram(
            "smtpproxy_connection_duration_seconds",
            "Duration of client connections.",
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.protocol_errors = Counter(
            "smtpproxy_protocol_errors",
            "Client protocol errors by kind (syntax, line_too_long, timeout, lost, bad_proxy, internal).",
            ["kind"],
            registry=r,
        )

        # Transactions and messages
        self.messages = Counter(
            "smtpproxy_messages",
            "Transactions ended, by final action and by the stage and reason that decided.",
            ["action", "stage", "reason"],
            registry=r,
        )
        # A new family rather than a label on smtpproxy_messages: existing series
        # and dashboards keep their names; this one splits the same count by mode.
        self.messages_by_mode = Counter(
            "smtpproxy_messages_by_mode",
            "Transactions ended, by mode (proxy: SMTP in front of the MTA; milter: inside it) and final action.",
            ["mode", "action"],
            registry=r,
        )
        self.mode_info = Gauge(
            "smtpproxy_mode_info",
            "1 for each mode this instance serves (proxy, milter).",
            ["mode"],
            registry=r,
            multiprocess_mode="max",
        )
        self.milter_connections = Counter(
            "smtpproxy_milter_connections",
            "MTA connections to the milter listener, counted at close.",
            registry=r,
        )
        self.milter_connections_active = Gauge(
            "smtpproxy_milter_connections_active",
            "MTA connections to the milter listener currently open.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.milter_protocol_errors = Counter(
            "smtpproxy_milter_protocol_errors",
            "Milter connections closed for a bad packet, by kind (malformed, oversized, out_of_order, unknown).",
            ["kind"],
            registry=r,
        )
        self.recipients = Counter(
            "smtpproxy_recipients",
            "RCPT TO commands by outcome (accepted, rejected, tempfailed).",
            ["outcome"],
            registry=r,
        )
        self.message_size = Histogram(
            "smtpproxy_message_size_bytes",
            "Size of messages received at end of DATA.",
            buckets=SIZE_BUCKETS,
            registry=r,
        )

        # Processing time
        self.stage_duration = Histogram(
            "smtpproxy_stage_duration_seconds",
            "Time to run the checks of one stage.",
            ["stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.check_duration = Histogram(
            "smtpproxy_check_duration_seconds",
            "Time one check took, by check name.",
            ["check"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.check_errors = Counter(
            "smtpproxy_check_errors",
            "Checks that raised or timed out, by check name and kind (error, timeout; field: a rule field that could not be read).",
            ["check", "kind"],
            registry=r,
        )
        self.data_duration = Histogram(
            "smtpproxy_data_duration_seconds",
            "End of DATA to the client's final reply: checks plus backend delivery.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        # Backend
        self.backend_replies = Counter(
            "smtpproxy_backend_replies",
            "Backend replies by command (mail, rcpt, data) and class (2xx, 4xx, 5xx).",
            ["command", "class"],
            registry=r,
        )
        self.backend_errors = Counter(
            "smtpproxy_backend_errors",
            "Backend failures by kind (connect, timeout, tls, protocol, disconnected, pool_exhausted, "
            "identity: XCLIENT/XFORWARD not offered or refused, tls_required: no TLS with require_tls).",
            ["kind"],
            registry=r,
        )
        self.backend_latency = Histogram(
            "smtpproxy_backend_latency_seconds",
            "Backend command round trip, by command.",
            ["command"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.backend_pool_size = Gauge(
            "smtpproxy_backend_pool_connections",
            "Backend connections open (idle and in use).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.backend_pool_in_use = Gauge(
            "smtpproxy_backend_pool_in_use",
            "Backend connections currently lent to a transaction.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.backend_up = Gauge(
            "smtpproxy_backend_up",
            "1 when the last backend connection attempt succeeded.",
            registry=r,
            multiprocess_mode="livemin",
        )

        # Authentication
        self.auth_results = Counter(
            "smtpproxy_auth_results",
            "Authentication results by method (spf, dkim, dmarc, arc) and result word.",
            ["method", "result"],
            registry=r,
        )
        self.dmarc_policy = Counter(
            "smtpproxy_dmarc_policy_applied",
            "DMARC policy applied to failing messages (none, quarantine, reject) and whether enforced.",
            ["policy", "enforced"],
            registry=r,
        )

        # Rules
        self.rule_hits = Counter(
            "smtpproxy_rule_hits", "Rules that matched, by rule name.", ["rule"], registry=r
        )
        self.rule_reloads = Counter(
            "smtpproxy_rule_reloads", "Rule reloads by outcome (success, failure).", ["outcome"], registry=r
        )
        self.rules_loaded = Gauge(
            "smtpproxy_rules_loaded", "Rules currently active.", registry=r, multiprocess_mode="livemax"
        )
        self.rules_last_reload = Gauge(
            "smtpproxy_rules_last_reload_timestamp_seconds",
            "Unix time of the last successful rule load.",
            registry=r,
            multiprocess_mode="livemax",
        )

        # Submission
        self.auth_attempts = Counter(
            "smtpproxy_auth_attempts",
            "AUTH attempts on the submission port, by result (success, failure, blocked, malformed, "
            "no_tls, backend_error).",
            ["result"],
            registry=r,
        )
        self.dkim_signed = Counter(
            "smtpproxy_dkim_signatures_added",
            "DKIM signatures added to outbound mail, by algorithm (rsa-sha256, ed25519-sha256).",
            ["algorithm"],
            registry=r,
        )

        # Rate limits
        self.ratelimit_hits = Counter(
            "smtpproxy_ratelimit_hits",
            "Requests refused by a rate limit, by limit name.",
            ["limit"],
            registry=r,
        )
        self.ratelimit_store_errors = Counter(
            "smtpproxy_ratelimit_store_errors",
            "Rate-limit store failures by kind (timeout, connection, error) and how they were handled.",
            ["kind", "handled"],
            registry=r,
        )
        self.session_limit_hits = Counter(
            "smtpproxy_session_limit_hits",
            "Per-connection limits exceeded, by limit name.",
            ["limit"],
            registry=r,
        )

        # DNS
        self.dns_queries = Counter(
            "smtpproxy_dns_queries",
            "DNS queries sent, by record type and outcome (ok, nxdomain, nodata, servfail, timeout, error).",
            ["type", "outcome"],
            registry=r,
        )
        self.dns_cache = Counter(
            "smtpproxy_dns_cache_lookups", "DNS cache lookups by result (hit, miss).", ["result"], registry=r
        )
        self.dns_latency = Histogram(
            "smtpproxy_dns_latency_seconds",
            "DNS query round trip, by record type.",
            ["type"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.event_loop_tasks = Gauge(
            "smtpproxy_event_loop_tasks",
            "asyncio tasks alive in the process (sampled every 5 s): a leak shows as steady growth.",
            registry=r,
            multiprocess_mode="livesum",
        )

        # TLS
        self.tls_cert_expiry = Gauge(
            "smtpproxy_tls_certificate_expiry_timestamp_seconds",
            "Unix time at which the inbound TLS certificate expires.",
            registry=r,
            multiprocess_mode="livemin",
        )

        for metric in vars(self).values():
            if isinstance(metric, Counter | Gauge | Histogram):
                _memoize_labels(metric)


def _memoize_labels(metric: Counter | Gauge | Histogram) -> None:
    """Make ``metric.labels(...)`` a dictionary lookup after the first call per label set.

    prometheus_client validates and locks on every ``labels()`` call (about a
    microsecond; some sixteen calls per message). Label values come from small
    closed sets, so the memo is as bounded as the metric's own series; nothing
    here removes series, so a memoized child is never stale.
    """
    children: dict[object, object] = {}
    unbound = metric.labels

    def labels(*values: object, **named: object) -> object:
        key: object = (values, tuple(named.items())) if named else values
        child = children.get(key)
        if child is None:
            child = children[key] = unbound(*values, **named)
        return child

    metric.labels = labels  # type: ignore[method-assign, assignment]
