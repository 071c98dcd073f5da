"""``workers: N``: N serving processes on one port, one supervisor serving the metrics.

Each worker is ``smtpproxy serve`` started with ``SMTPPROXY_WORKER=1``: it binds
the SMTP port with SO_REUSEPORT (the kernel spreads connections over the
workers) and serves no metrics port. Workers write their metrics into
``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess mode); the
supervisor aggregates them on the one metrics port. SIGTERM/SIGINT are passed
on to every worker, which drain as a single process does; SIGHUP too. A worker
that dies is restarted.

Rate limits with the memory store are per worker; configure
``ratelimit_store: redis://...`` for limits exact across workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, multiprocess

from smtpproxy.backend.factory import make_backend
from smtpproxy.config import Config
from smtpproxy.dns import DnsReadiness, Resolver
from smtpproxy.httpserver import MetricsServer
from smtpproxy.metrics import Metrics

log = logging.getLogger("smtpproxy.workers")

WORKER_ENV = "SMTPPROXY_WORKER"
RESTART_DELAY = 1.0


def is_worker() -> bool:
    """True in a worker process started by the supervisor."""
    return os.environ.get(WORKER_ENV) == "1"


class Supervisor:
    """Starts, watches and stops the worker processes."""

    def __init__(self, config: Config, config_path: str | None) -> None:
        self.config = config
        self.config_path = config_path
        self.metrics_dir = Path(tempfile.mkdtemp(prefix="smtpproxy-metrics-"))
        self.workers: list[subprocess.Popen[bytes]] = []
        self.stopping = False

    def _spawn(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "smtpproxy", "serve"]
        if self.config_path:
            cmd += ["--config", self.config_path]
        env = {**os.environ, WORKER_ENV: "1", "PROMETHEUS_MULTIPROC_DIR": str(self.metrics_dir)}
        return subprocess.Popen(cmd, env=env)

    def _signal_all(self, sig: int) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def ready(self) -> str | None:
        """Ready when every worker runs, DNS answers and the backend answers."""
        dead = [p.pid for p in self.workers if p.poll() is not None]
        if dead:
            return f"workers not running: {dead}"
        dns_problem = await self._dns_readiness.problem()
        if dns_problem is not None:
            return dns_problem
        return await self._backend_probe()

    async def run(self) -> int:
        """Supervise until SIGTERM/SIGINT; returns the exit code."""
        loop = asyncio.get_running_loop()
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(self.metrics_dir)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.metrics_dir))  # type: ignore[no-untyped-call]
        probe_metrics = Metrics(CollectorRegistry(), process=False)
        backend = make_backend(self.config.backend, self.config, probe_metrics)
        self._backend_probe = backend.probe
        # The workers' resolvers use these nameservers too: one probe speaks for all.
        resolver = Resolver(self.config.dns.nameservers, timeout=self.config.dns.timeout)
        self._dns_readiness = DnsReadiness(resolver)
        server = None
        maddr = self.config.metrics_address
        if maddr is not None:
            server = MetricsServer(registry, self.ready, maddr.host, maddr.port)
            await server.start()
        self.workers = [self._spawn() for _ in range(self.config.workers)]
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._signal_all, signal.SIGHUP)
        log.info("supervising", extra={"fields": {"workers": [p.pid for p in self.workers]}})
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            for i, proc in enumerate(self.workers):
                if proc.poll() is not None and not stop.is_set():
                    log.error("worker %d exited with %s; restarting", proc.pid, proc.returncode)
                    multiprocess.mark_process_dead(proc.pid, str(self.metrics_dir))  # type: ignore[no-untyped-call]
                    await asyncio.sleep(RESTART_DELAY)
                    self.workers[i] = self._spawn()
        self._signal_all(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_grace + 10
        code = 0
        for proc in self.workers:
            remaining = max(0.1, deadline - time.monotonic())
            try:
                rc = await asyncio.to_thread(proc.wait, remaining)
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = await asyncio.to_thread(proc.wait)
            code = code or (rc if rc and rc > 0 else 0)
        if server is not None:
            await server.stop()
        await backend.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)
        return code
