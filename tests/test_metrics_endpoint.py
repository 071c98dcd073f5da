"""The metrics port: Prometheus and OpenMetrics text, health and readiness, metrics that move."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message


async def fetch(url: str, accept: str | None = None) -> tuple[int, str, str]:
    def get() -> tuple[int, str, str]:
        req = urllib.request.Request(url, headers={"Accept": accept} if accept else {})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return resp.status, resp.headers["Content-Type"], resp.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read().decode()

    return await asyncio.to_thread(get)


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


async def test_metrics_move_with_traffic(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    backend.rcpt_replies["gone@example.org"] = "550 5.1.1 no"
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        await c.send_message("s@sender.example", ["user@example.org", "gone@example.org"], make_message())
        await c.cmd("QUIT")
    await asyncio.sleep(0.05)
    status, ctype, text = await fetch(proxy.metrics_url + "/metrics")
    assert status == 200 and ctype.startswith("text/plain")
    assert sample(text, "smtpproxy_messages_total", action="delivered", stage="data", reason="clean") == 1
    assert sample(text, "smtpproxy_recipients_total", outcome="accepted") == 1
    assert sample(text, "smtpproxy_recipients_total", outcome="rejected") == 1
    assert sample(text, "smtpproxy_backend_replies_total", command="data") == 1
    assert sample(text, "smtpproxy_connections_total", tls="plain") == 1
    assert sample(text, "smtpproxy_message_size_bytes_count") == 1
    assert sample(text, "smtpproxy_build_info", version=__import__("smtpproxy").__version__) == 1
    assert "process_resident_memory_bytes" in text


async def test_openmetrics_when_asked(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    status, ctype, text = await fetch(proxy.metrics_url + "/metrics", accept="application/openmetrics-text")
    assert status == 200 and ctype.startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")


async def test_healthz_and_readyz_follow_the_backend(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    assert (await fetch(proxy.metrics_url + "/healthz"))[0] == 200
    assert (await fetch(proxy.metrics_url + "/readyz"))[0] == 200
    port = backend.port
    await backend.stop()
    await asyncio.sleep(1.1)  # readiness is cached for a second
    status, _, body = await fetch(proxy.metrics_url + "/readyz")
    assert status == 503 and "backend" in body
    await backend.start(port)
    await asyncio.sleep(1.1)
    assert (await fetch(proxy.metrics_url + "/readyz"))[0] == 200


async def test_unknown_path_and_method(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    assert (await fetch(proxy.metrics_url + "/nope"))[0] == 404


async def test_backend_up_is_probed_at_start_without_traffic(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy()
    for _ in range(50):
        _, _, text = await fetch(proxy.metrics_url + "/metrics")
        if sample(text, "smtpproxy_backend_up") == 1:
            break
        await asyncio.sleep(0.1)
    assert sample(text, "smtpproxy_backend_up") == 1
    assert sample(text, "smtpproxy_stage_duration_seconds_count", stage="connect") == 0


async def test_transaction_log_words_are_the_metric_labels(
    backend: RecordingBackend, start_proxy, caplog
) -> None:
    backend.data_reply = "554 5.6.0 Content refused"
    proxy = await start_proxy()
    with caplog.at_level("INFO", logger="smtpproxy.transaction"):
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            await c.send_message("s@sender.example", ["user@example.org"], make_message())
            await c.cmd("QUIT")
    fields = [r.fields for r in caplog.records if r.name == "smtpproxy.transaction"]  # type: ignore[attr-defined]
    assert len(fields) == 1
    line = fields[0]
    assert (line["action"], line["stage"], line["reason"]) == ("rejected", "data", "backend")
    _, _, text = await fetch(proxy.metrics_url + "/metrics")
    assert sample(text, "smtpproxy_messages_total", action="rejected", stage="data", reason="backend") == 1


async def test_bad_proxy_header_is_counted(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"proxy_protocol": {"trusted_networks": ["127.0.0.0/8"], "timeout": 1}})
    reader, writer = await asyncio.open_connection(proxy.host, proxy.port)
    writer.write(b"PROXY TCP4 garbage\r\n")
    await writer.drain()
    assert await reader.read() == b""  # closed without a banner
    writer.close()
    _, _, text = await fetch(proxy.metrics_url + "/metrics")
    assert sample(text, "smtpproxy_protocol_errors_total", kind="bad_proxy") == 1


async def test_idle_timeout_is_counted(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy({"limits": {"idle_timeout": 0.2}})
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.reply()).code == 421
    _, _, text = await fetch(proxy.metrics_url + "/metrics")
    assert sample(text, "smtpproxy_protocol_errors_total", kind="timeout") == 1


async def test_mail_stage_refusal_uses_the_same_action_words(backend: RecordingBackend, start_proxy) -> None:
    proxy = await start_proxy(
        {"ratelimits": [{"name": "one_msg", "key": "client_ip", "rate": "1/hour", "burst": 1, "on": "mail"}]}
    )
    async with RawClient(proxy.host, proxy.port) as c:
        await c.connect()
        assert (await c.send_message("s@sender.example", ["user@example.org"], make_message())).code == 250
        assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 450
    _, _, text = await fetch(proxy.metrics_url + "/metrics")
    assert (
        sample(text, "smtpproxy_messages_total", action="tempfailed", stage="mail", reason="ratelimit") == 1
    )
    assert sample(text, "smtpproxy_messages_total", action="tempfail") == 0
