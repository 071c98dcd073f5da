"""No relay through a real Postfix that trusts us: routed local parts and accept rules.

The Postfix instance trusts loopback (Debian's ``mynetworks``), as most
backends trust the proxy in front of them, and has a local domain
(``mydestination``, where Postfix honours the percent hack and bang paths):
given ``user%evil.example@local.example`` it would route the mail to
evil.example. Its ``error`` transports tell us it would have (``test instance:
relaying disabled``) without anything leaving.
"""

from __future__ import annotations

import asyncio
import smtplib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.postfix import PostfixInstance, postfix_available
from tests.smtpclient import RawClient
from tests.test_accept_protection import ROUTED, write_rules
from tests.test_open_relay_nmap import nmap_data_dir, smtp_open_relay

QUIET = {name: {"enabled": False} for name in ("spf", "dkim", "arc", "dmarc")}
WOULD_RELAY = "relaying disabled"
LOCAL = "local.example"
ROUTED_LOCAL = tuple(r.replace("example.org", LOCAL) for r in ROUTED)


@pytest.fixture(scope="module")
def trusting_postfix() -> Iterator[PostfixInstance]:
    """A private Postfix with a local domain, trusting 127/8 (Debian's defaults but for the names)."""
    if not postfix_available():
        pytest.skip("postfix is not installed (CI installs the postfix package)")
    instance = PostfixInstance()
    instance.configure(mydestination=LOCAL)
    try:
        instance.start()
        yield instance
    finally:
        instance.cleanup()


def ask_postfix_directly(pf: PostfixInstance, rcpt: str) -> tuple[int, bytes]:
    """RCPT straight to Postfix from 127.0.0.1, the address it trusts (as it trusts the proxy)."""
    with smtplib.SMTP("127.0.0.1", pf.port, timeout=10) as s:
        s.ehlo("proxy.test")
        s.mail("s@sender.example")
        return s.rcpt(rcpt)


async def test_postfix_would_route_the_percent_hack_for_its_trusted_proxy(
    trusting_postfix: PostfixInstance,
) -> None:
    """The danger is real: the backend routes what the proxy passes on."""
    code, text = await asyncio.to_thread(ask_postfix_directly, trusting_postfix, f"user%evil.example@{LOCAL}")
    assert code == 550 and WOULD_RELAY.encode() in text, (code, text)


@pytest.mark.parametrize("accept_rule", [False, True], ids=["plain", "accept-everyone-at-connect"])
async def test_routed_local_parts_never_reach_postfix(
    trusting_postfix: PostfixInstance, start_proxy, tmp_path: Path, accept_rule: bool
) -> None:
    overrides: dict[str, Any] = {**QUIET, "relay_domains": ["example.org", LOCAL]}
    if accept_rule:
        rule = {"name": "allow_all", "stage": "connect", "if": {"client.ip": {"cidr": ["0.0.0.0/0"]}}}
        write_rules(tmp_path / "rules", [{**rule, "then": "accept"}])
        overrides["rules"] = str(tmp_path / "rules")
    proxy = await start_proxy(overrides, backend_port=trusting_postfix.port)
    mark = trusting_postfix.log_mark()
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.cmd("EHLO client.test")
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
        for rcpt in (*ROUTED, *ROUTED_LOCAL, "<victim@elsewhere.example>"):
            r = await c.cmd(f"RCPT TO:{rcpt}")
            assert (r.code, r.text[:5]) == (550, "5.7.1"), (rcpt, r)
        assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
        await c.cmd("QUIT")
    log = trusting_postfix.maillog_since(mark)
    assert "evil.example" not in log and "elsewhere.example" not in log and WOULD_RELAY not in log, log


async def test_nmap_finds_no_relay_through_proxy_and_postfix(
    trusting_postfix: PostfixInstance, start_proxy, tmp_path: Path
) -> None:
    proxy = await start_proxy(
        {**QUIET, "relay_domains": ["example.org", LOCAL, "mx.test.example"]},
        backend_port=trusting_postfix.port,
    )
    mark = trusting_postfix.log_mark()
    text = await smtp_open_relay(proxy.port, nmap_data_dir(tmp_path / "nmap", proxy.port))
    assert "doesn't seem to be an open relay" in text, text
    assert WOULD_RELAY not in trusting_postfix.maillog_since(mark)
