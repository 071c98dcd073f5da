"""The ``ratelimit`` rule action through the running proxy: memory store, and two proxies sharing Redis."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path
from typing import Any

from smtpproxy.ratelimit.check import RateLimitCheck
from tests.backends import RecordingBackend
from tests.redisserver import RedisServer, redis_server
from tests.smtpclient import RawClient, SmtpReply, make_message

__all__ = ["redis_server"]  # the fixture, imported for pytest

NO_AUTH: dict[str, Any] = {k: {"enabled": False} for k in ("spf", "dkim", "arc", "dmarc")}

PER_DOMAIN = """\
- name: per_sender_domain
  stage: mail
  if: {mail_from.domain: {exists: true}}
  then:
    - {ratelimit: {key: [mail_from.domain, client.ip], rate: 100/hour, burst: BURST}}
    - {add_header: {name: X-Sender-Limited, value: "yes"}}
"""


def rules_folder(tmp_path: Path, text: str) -> str:
    folder = tmp_path / "rules"
    folder.mkdir(exist_ok=True)
    (folder / "10-limits.yaml").write_text(text)
    return str(folder)


async def send(proxy: Any, sender: str) -> SmtpReply:
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220
        reply = await c.send_message(sender, ["user@example.org"], make_message())
        await c.cmd("QUIT")
        return reply


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return str(response.read().decode())


async def test_mail_limit_through_the_proxy(
    backend: RecordingBackend, start_proxy: Any, tmp_path: Path
) -> None:
    folder = rules_folder(tmp_path, PER_DOMAIN.replace("BURST", "2"))
    proxy = await start_proxy({"rules": folder, **NO_AUTH})
    app = proxy.app
    # The rules count in the same limiter (the same store) as the configured limits.
    assert [c.limiter for c in app.checks if isinstance(c, RateLimitCheck)] == [app.rules.limiter]
    for _ in range(2):
        assert (await send(proxy, "a@sender.example")).code == 250
    refused = await send(proxy, "b@sender.example")
    assert (refused.code, refused.text) == (
        450,
        "4.7.1 Rate limit per_sender_domain exceeded, try again later",
    )
    assert (await send(proxy, "a@other.example")).code == 250
    assert len(backend.messages) == 3
    assert all(b"X-Sender-Limited: yes\r\n" in m.content for m in backend.messages)
    scraped = await asyncio.to_thread(fetch, proxy.metrics_url + "/metrics")
    assert 'smtpproxy_ratelimit_hits_total{limit="per_sender_domain"} 1.0' in scraped


async def test_connect_limit_answers_421_and_closes(
    backend: RecordingBackend, start_proxy: Any, tmp_path: Path
) -> None:
    text = "- {name: per_ip, stage: connect, then: {ratelimit: {key: client.ip, rate: 1/hour, burst: 1}}}\n"
    proxy = await start_proxy({"rules": rules_folder(tmp_path, text), **NO_AUTH})
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220
    async with RawClient(proxy.host, proxy.port) as c:
        banner = await c.connect()
        assert (banner.code, banner.text) == (421, "4.7.0 Rate limit per_ip exceeded, try again later")
        assert await c.closed()


async def test_two_proxies_share_one_limit_in_redis(
    backend: RecordingBackend, start_proxy: Any, tmp_path: Path, redis_server: RedisServer
) -> None:
    overrides = {
        "rules": rules_folder(tmp_path, PER_DOMAIN.replace("BURST", "3")),
        "ratelimit_store": redis_server.url,
        **NO_AUTH,
    }
    first, second = await start_proxy(overrides), await start_proxy(overrides)
    codes = [(await send(proxy, "a@sender.example")).code for proxy in (first, second, first)]
    assert codes == [250, 250, 250]
    # The fourth is refused whichever instance gets it: the count lives in Redis.
    assert (await send(second, "a@sender.example")).code == 450
    assert (await send(first, "a@sender.example")).code == 450
    assert len(backend.messages) == 3
    assert b"rule:per_sender_domain:" in redis_server.command("KEYS", "*")
