"""The application object: everything built once from the config, and the server lifecycle.

No module-level state: the App owns the metrics registry, the resolver, the
backend pool, the pipeline and the listening sockets, and hands itself to each
connection (uvicorn's Server pattern).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import ssl
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from smtpproxy import __version__
from smtpproxy.addresses import HostPort, parse_hostport
from smtpproxy.auth.authresults import forged_filter
from smtpproxy.auth.checks import build_auth_checks
from smtpproxy.backend import Backend, ClientFacts
from smtpproxy.backend.factory import make_backend
from smtpproxy.backend.relay import relay_message
from smtpproxy.config import Config
from smtpproxy.core_checks import LimitsCheck, RelayCheck
from smtpproxy.dns import DnsReadiness, Resolver
from smtpproxy.httpserver import MetricsServer
from smtpproxy.inflight import InflightBudget, default_budget
from smtpproxy.logs import EventLog, flush_logs
from smtpproxy.metrics import Metrics
from smtpproxy.milter.nobackend import NoBackend
from smtpproxy.milter.server import MilterServer
from smtpproxy.pipeline import Pipeline
from smtpproxy.policy import Policy
from smtpproxy.ratelimit.check import build_ratelimit_checks, build_ratelimiter
from smtpproxy.ratelimit.session_limits import SessionLimits
from smtpproxy.rules.engine import RulesEngine, build_rules_engine
from smtpproxy.server import InboundSMTP
from smtpproxy.session import Session, Transaction
from smtpproxy.stages import Check
from smtpproxy.submission.build import build_submission
from smtpproxy.tls import certificate_expiry, make_tls_context
from smtpproxy.verdict import Reply

log = logging.getLogger("smtpproxy.app")

BACKEND_PROBE_INTERVAL = 30.0  # seconds between backend probes while no client is connected


class App:
    """One proxy instance built from a validated Config."""

    def __init__(self, config: Config, *, metrics: Metrics | None = None, worker: bool = False) -> None:
        self.config = config
        self.worker = worker  # one of several processes sharing the port (workers: N)
        # Worker processes report through the supervisor's multiprocess directory.
        self.metrics = metrics or Metrics(process=not worker)
        self.logs = EventLog()
        self.resolver = Resolver(
            config.dns.nameservers,
            timeout=config.dns.timeout,
            cache_size=config.dns.cache_size,
            metrics=self.metrics,
        )
        # Milter only (listen: null): the MTA keeps the mail, nothing is relayed.
        self.backend: Backend = (
            NoBackend() if config.listen is None else make_backend(config.backend, config, self.metrics)
        )
        self._quarantine_backends: dict[str, Backend] = {}
        self.tls_context = (
            make_tls_context(
                str(config.path(config.tls.cert)), str(config.path(config.tls.key)), config.tls.min_version
            )
            if config.tls.cert is not None and config.tls.key is not None
            else None
        )
        if config.tls.cert is not None:
            self._record_cert_expiry(config.path(config.tls.cert))
        self._trusted_proxies = [
            ipaddress.ip_network(n, strict=False) for n in config.proxy_protocol.trusted_networks
        ]
        self.session_limits = SessionLimits(config.session_limits, self.metrics)
        # One limiter (one store) for the configured limits and the rules' ratelimit action.
        self.limiter = build_ratelimiter(config, self.metrics)
        # Raises RulesError on a bad rules folder: the CLI reports it and exits 2.
        self.rules: RulesEngine = build_rules_engine(config, self.resolver, self.metrics, self.limiter)
        self.forged_ar = forged_filter(config.hostname)
        self.checks: list[Check] = self.build_checks()
        self.pipeline = Pipeline(
            self.checks, self.metrics, timeout=config.check_timeout, on_error=config.on_check_error
        )
        # Raises PasswdError, SenderLoginError or SignerError naming the file: the CLI exits 2.
        self.submission = build_submission(config, self.checks, self.limiter, self.metrics)
        self.policy = Policy(
            self.pipeline,
            self.session_limits,
            self.metrics,
            self.logs,
            config.hostname,
            self.forged_ar,
            submission=self.submission,
        )
        # The same checks for the milter; only the mode in logs and metrics differs.
        self.milter_policy = Policy(
            self.pipeline,
            self.session_limits,
            self.metrics,
            self.logs,
            config.hostname,
            self.forged_ar,
            "milter",
        )
        milter_address = config.milter.address
        self.milter = MilterServer(self, milter_address) if milter_address is not None else None
        self.connections: set[InboundSMTP] = set()
        self.inflight = InflightBudget(
            config.limits.max_inflight_bytes or default_budget(), self.metrics.inflight_bytes
        )
        self.draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.base_events.Server | None = None
        self._submission_servers: dict[str, asyncio.base_events.Server] = {}  # "listen", "listen_tls"
        self._metrics_server: MetricsServer | None = None
        self._housekeeping: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._log_flusher: asyncio.Task[None] | None = None
        self._ready_cache: tuple[float, str | None] = (0.0, "not started")
        self.dns_readiness = DnsReadiness(self.resolver)

    def build_checks(self) -> list[Check]:
        """The checks in pipeline order: cheap policy first, then authentication, then rules.

        Rate limits run before relay checks so a flood is refused before any
        other work; rules run last (``after`` makes them wait for DMARC).
        """
        checks: list[Check] = [*build_ratelimit_checks(self.config, self.metrics, self.limiter)]
        checks += [
            RelayCheck(self.config.relay_domains, self.config.relay_networks),
            LimitsCheck(self.config.limits, self.config.max_messages_per_connection),
        ]
        checks += build_auth_checks(self.config, self.resolver, self.metrics)
        checks.append(self.rules.check)
        return checks

    async def close_checks(self) -> None:
        """Release what checks hold (Redis connections)."""
        for check in self.checks:
            close = getattr(check, "close", None)
            if close is not None:
                try:
                    await close()
                except Exception:
                    log.exception("closing check %s failed", check.name)

    # -- connections ----------------------------------------------------------

    def proxy_timeout_for(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> float | None:
        """The PROXY header timeout for a peer we trust to send one; None for everyone else."""
        if any(ip in net for net in self._trusted_proxies):
            return self.config.proxy_protocol.timeout
        return None

    def admit(self, conn: InboundSMTP) -> bool:
        """Count a new connection in, unless we are at the limit or draining."""
        if self.draining or len(self.connections) >= self.config.limits.max_connections:
            return False
        self.connections.add(conn)
        self.metrics.connections_active.set(len(self.connections))
        return True

    def release(self, conn: InboundSMTP) -> None:
        """A connection ended."""
        if conn in self.connections:
            self.connections.discard(conn)
            self.metrics.connections_active.set(len(self.connections))
            facts = conn.conn.session if conn.conn else None
            if facts is not None:
                self.metrics.connections.labels("tls" if facts.tls else "plain").inc()
                self.metrics.connection_duration.observe(time.monotonic() - facts.started)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Run a background task, keeping a reference until it ends."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def start_rdns(self, session: Session) -> None:
        """Look up the client's verified reverse name in the background (used in Received and rules)."""
        if not self.config.dns.reverse_lookup:
            return

        async def lookup() -> None:
            session.rdns = await self.resolver.reverse_name(session.client_address)

        self.spawn(lookup())

    def reload(self) -> None:
        """SIGHUP: reload what can change without a restart (rules, TLS certificate, submission files)."""
        self.rules.reload()
        if self.submission is not None:
            self.submission.reload()
        if (
            self.tls_context is not None
            and self.config.tls.cert is not None
            and self.config.tls.key is not None
        ):
            cert = self.config.path(self.config.tls.cert)
            try:
                self.tls_context.load_cert_chain(str(cert), str(self.config.path(self.config.tls.key)))
                log.info("TLS certificate reloaded")
            except (OSError, ValueError, ssl.SSLError) as err:
                log.error("TLS certificate reload failed, keeping the old one: %s", err)
                return
            self._record_cert_expiry(cert)

    def _record_cert_expiry(self, cert: Path) -> None:
        expiry = certificate_expiry(cert)
        if expiry is not None:
            self.metrics.tls_cert_expiry.set(expiry)

    # -- delivery -------------------------------------------------------------

    async def quarantine(self, destination: str, session: Session, txn: Transaction, message: bytes) -> Reply:
        """Deliver a quarantined message to its own destination (maildir:PATH or smtp://)."""
        backend = self._quarantine_backends.get(destination)
        if backend is None:
            backend = make_backend(destination, self.config, self.metrics)
            self._quarantine_backends[destination] = backend
        facts = ClientFacts(session.client_address, session.helo, session.rdns, session.esmtp)
        reply = await relay_message(
            backend, facts, txn.mail_from, [r.address for r in txn.recipients], message
        )
        # The client keeps the message if the quarantine will not take it: never a bounce.
        return (
            reply
            if reply.is_positive or reply.is_transient
            else Reply(451, "4.3.0", "Quarantine refused the message")
        )

    async def readiness(self) -> str | None:
        """None when listening, DNS answers and the backend answers; else why not.

        Without DNS every message would get 451 4.4.3 (SPF/DMARC temperror): not
        ready. The DNS outcome is cached five seconds, the backend's one.
        """
        smtp_up = self._server is not None and self._server.is_serving()
        if not smtp_up and not (self.milter is not None and self.milter.serving):
            return "not listening"
        dns_problem = await self.dns_readiness.problem()
        if dns_problem is not None:
            return dns_problem
        if time.monotonic() - self._ready_cache[0] < 1.0:
            return self._ready_cache[1]
        return await self.probe_backend()

    # -- lifecycle --------------------------------------------------------------

    async def start(self) -> None:
        """Bind the SMTP and metrics ports and start serving."""
        loop = asyncio.get_running_loop()
        addr = self.config.listen_address
        if addr is not None:
            self._server = await loop.create_server(
                lambda: InboundSMTP(self),
                host=addr.host,
                port=addr.port,
                family=socket.AF_INET6 if ":" in addr.host else socket.AF_UNSPEC,
                reuse_address=True,
                reuse_port=self.worker,
                backlog=1024,
            )
            self.metrics.mode_info.labels("proxy").set(1)
            await self._start_submission(loop)
        if self.milter is not None:
            await self.milter.start()
            self.metrics.mode_info.labels("milter").set(1)
        self._ready_cache = (0.0, None)
        maddr = None if self.worker else self.config.metrics_address
        if maddr is not None:
            self._metrics_server = MetricsServer(
                self.metrics.registry, self.readiness, maddr.host, maddr.port
            )
            await self._metrics_server.start()
        self._housekeeping = loop.create_task(self._housekeep())
        self._log_flusher = loop.create_task(self._flush_logs())
        interval = self.config.rules_options.reload_interval
        if interval > 0:
            self._watcher = loop.create_task(self.rules.watch(interval))
        self._log_what_is_in_force()

    async def _start_submission(self, loop: asyncio.AbstractEventLoop) -> None:
        """The submission listeners: ``listen`` (STARTTLS before AUTH) and ``listen_tls`` (RFC 8314)."""
        section = self.config.submission
        if section is None:
            return
        for key, value in (("listen", section.listen), ("listen_tls", section.listen_tls)):
            if value is None:
                continue
            addr = parse_hostport(value)
            implicit = key == "listen_tls"
            self._submission_servers[key] = await loop.create_server(
                lambda implicit=implicit: InboundSMTP(self, submission=True, implicit_tls=implicit),
                host=addr.host,
                port=addr.port,
                family=socket.AF_INET6 if ":" in addr.host else socket.AF_UNSPEC,
                reuse_address=True,
                reuse_port=self.worker,
                backlog=1024,
                ssl=self.tls_context if implicit else None,
            )

    def submission_address(self, key: str = "listen") -> tuple[str, int]:
        """The bound (host, port) of the submission listener ``listen`` or ``listen_tls``."""
        name = self._submission_servers[key].sockets[0].getsockname()
        return str(name[0]), int(name[1])

    def _log_what_is_in_force(self) -> None:
        """One line at start with what protects this instance, and a warning when nothing relays."""
        config = self.config
        metrics = None  # off, or a worker (the supervisor serves the metrics)
        if self._metrics_server is not None and config.metrics_address is not None:
            metrics = str(HostPort(config.metrics_address.host, self._metrics_server.port))
        log.info(
            "listening",
            extra={
                "fields": {
                    "listen": str(HostPort(*self.listen_port_address)) if self._server else None,
                    "milter": self.milter.bound if self.milter is not None else None,
                    "metrics": metrics,
                    "backend": config.backend if config.listen is not None else None,  # milter only: none
                    "relay_domains": len(config.relay_domains),
                    "relay_networks": len(config.relay_networks),
                    "rules": len(self.rules.current),
                    "rules_folder": None if config.rules_path is None else str(config.rules_path),
                    "version": __version__,
                    "checks": [check.name for check in self.checks],
                }
            },
        )
        if not config.relay_domains:
            also = " except from relay_networks" if config.relay_networks else ""
            log.warning("relay_domains is empty: every recipient will be refused with 550 5.7.1%s", also)
        for note in self.config.spelling_notes:
            log.warning("%s", note)

    @property
    def listen_port_address(self) -> tuple[str, int]:
        """The bound (host, port) of the SMTP listener (useful with port 0)."""
        assert self._server is not None
        name = self._server.sockets[0].getsockname()
        return str(name[0]), int(name[1])

    @property
    def metrics_port(self) -> int | None:
        """The bound metrics port, None when disabled."""
        return self._metrics_server.port if self._metrics_server else None

    async def probe_backend(self) -> str | None:
        """Probe the backend now and record the outcome in ``smtpproxy_backend_up``."""
        problem = await self.backend.probe()
        self.metrics.backend_up.set(0 if problem else 1)
        self._ready_cache = (time.monotonic(), problem)
        return problem

    async def _flush_logs(self) -> None:
        while True:
            await asyncio.sleep(0.25)
            flush_logs()

    async def _housekeep(self) -> None:
        # backend_up must be true from the start, not only after the first
        # message; an idle proxy re-probes so the gauge keeps telling the truth.
        last_probe = 0.0
        while True:
            try:
                now = time.monotonic()
                if not self.connections and now - last_probe >= BACKEND_PROBE_INTERVAL:
                    last_probe = now
                    await self.probe_backend()
                await self.backend.sweep()
                self.metrics.event_loop_tasks.set(len(asyncio.all_tasks()))
            except Exception:
                log.exception("backend housekeeping failed")
            await asyncio.sleep(5)

    async def stop(self, grace: float | None = None) -> None:
        """Stop accepting, let transactions in flight finish within ``grace`` seconds, close the rest."""
        grace = self.config.shutdown_grace if grace is None else grace
        self.draining = True
        if self._server is not None:
            self._server.close()
        milter_drained = asyncio.ensure_future(self.milter.stop(grace)) if self.milter is not None else None
        for server in self._submission_servers.values():
            server.close()
        for conn in list(self.connections):
            conn.close_if_idle()
        deadline = time.monotonic() + grace
        while self.connections and time.monotonic() < deadline:
            for conn in list(self.connections):
                conn.close_if_idle()
            await asyncio.sleep(0.05)
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.close()
        if milter_drained is not None:
            await milter_drained
        await asyncio.sleep(0)
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
        if self._log_flusher is not None:
            self._log_flusher.cancel()
        flush_logs()
        if self._metrics_server is not None:
            await self._metrics_server.stop()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2.0)
        await self.backend.close()
        for backend in self._quarantine_backends.values():
            await backend.close()
        await self.close_checks()
        await self.resolver.close()
