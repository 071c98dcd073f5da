"""Shared fixtures: a recording backend and a real proxy on loopback, in the test's event loop."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from smtpproxy.app import App
from smtpproxy.config import build_config
from smtpproxy.dns import Resolver
from tests.backends import RecordingBackend
from tests.dnsserver import DnsServer


@dataclass
class RunningProxy:
    """A started App and where to reach it."""

    app: App
    host: str
    port: int
    metrics_url: str | None


@pytest.fixture(scope="session")
def dns_server() -> Iterator[DnsServer]:
    """A real DNS server on loopback; without zone data every name is NXDOMAIN (SPF/DMARC none)."""
    server = DnsServer({})
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def resolver(dns: DnsServer) -> AsyncIterator[Resolver]:
    """A resolver on the test module's own ``dns`` server fixture (its zone data)."""
    # 2 s: a loaded 2-core machine answers in time; tests of timeouts wait this long on purpose.
    r = Resolver([dns.address], timeout=2.0)
    yield r
    await r.close()


@pytest.fixture
async def backend() -> AsyncIterator[RecordingBackend]:
    """A recording aiosmtpd backend on 127.0.0.1."""
    b = RecordingBackend()
    await b.start()
    yield b
    await b.stop()


def proxy_config(
    backend_port: int | None,
    overrides: dict[str, Any],
    base_dir: Path | None = None,
    dns: str = "127.0.0.1:9",
) -> dict[str, Any]:
    """The test defaults for a proxy config, merged with ``overrides`` (one level deep for sections)."""
    data: dict[str, Any] = {
        "listen": "127.0.0.1:0",
        "hostname": "mx.test.example",
        "backend": f"smtp://127.0.0.1:{backend_port}" if backend_port else "maildir:./var/mail",
        "metrics": "127.0.0.1:0",
        "relay_domains": ["example.org"],
        "dns": {"reverse_lookup": False, "timeout": 2.0, "nameservers": [dns]},
        "backend_options": {
            "tls_verify": False,
            "connect_timeout": 2.0,
            "command_timeout": 5.0,
            "data_timeout": 5.0,
        },
        "log": {"level": "warning"},
        "rules": None,  # no rules, on purpose (a missing folder is a config error)
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


@pytest.fixture
async def start_proxy(
    request: pytest.FixtureRequest, tmp_path: Path, dns_server: DnsServer
) -> AsyncIterator[Callable[..., Awaitable[RunningProxy]]]:
    """Factory: ``await start_proxy({"limits": {...}})`` starts a proxy in front of the ``backend`` fixture."""
    apps: list[App] = []

    async def factory(
        overrides: dict[str, Any] | None = None, *, backend_port: int | None = None
    ) -> RunningProxy:
        port = backend_port
        if port is None and "backend" in request.fixturenames:
            port = request.getfixturevalue("backend").port
        data = proxy_config(port, overrides or {}, tmp_path, dns=dns_server.address)
        config = build_config(data, base_dir=tmp_path)
        app = App(config)
        await app.start()
        apps.append(app)
        host, lport = app.listen_port_address
        murl = f"http://127.0.0.1:{app.metrics_port}" if app.metrics_port else None
        return RunningProxy(app, host, lport, murl)

    yield factory
    for app in apps:
        await app.stop(grace=0.5)
