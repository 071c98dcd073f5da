"""Rules through the running proxy: every action at mail, rcpt and data; hot reload under load."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, dot_stuff, make_message

ACTIONS = {
    "reject": '{reject: {code: 554, enhanced: "5.7.1", text: "Refused by rule"}}',
    "tempfail": '{tempfail: {code: 450, enhanced: "4.7.1", text: "Deferred by rule"}}',
    "discard": "discard",
    "quarantine": "quarantine",
    "add_header": "{add_header: {name: X-Rule-Hit, value: STAGE}}",
}
STAGES = ("mail", "rcpt", "data")
# Authentication is not under test here: keep it from querying the (absent) DNS.
QUIET = {
    "spf": {"enabled": False},
    "dkim": {"enabled": False},
    "arc": {"enabled": False},
    "dmarc": {"enabled": False},
}


SHIPPED = Path(__file__).resolve().parent.parent / "smtpproxy" / "data" / "rules"


def read_file(path: str | Path) -> bytes:
    """Sync file read (kept out of the async tests)."""
    return Path(path).read_bytes()


def write_rules(folder: Path) -> None:
    rules = []
    for stage in STAGES:
        for action, then in ACTIONS.items():
            rules.append(
                f"- name: {action}_{stage}\n  stage: {stage}\n  if: {{mail_from.local: {action}-{stage}}}\n"
                f"  then: {then.replace('STAGE', stage)}\n"
            )
    folder.mkdir(exist_ok=True)
    (folder / "10-actions.yaml").write_text("".join(rules))


async def send(proxy: Any, sender: str, message: bytes | None = None) -> tuple[list[int], str]:
    """MAIL, RCPT, DATA; returns the codes seen and the text of the last reply."""
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220
        assert (await c.cmd("EHLO client.test")).code == 250
        codes = []
        r = await c.cmd(f"MAIL FROM:<{sender}>")
        codes.append(r.code)
        if r.code == 250:
            r = await c.cmd("RCPT TO:<user@example.org>")
            codes.append(r.code)
        if r.code == 250:
            r = await c.cmd("DATA")
            if r.code == 354:
                r = await c.cmd(dot_stuff(message or make_message()) + b".")
            codes.append(r.code)
        await c.cmd("QUIT")
        return codes, r.text


@pytest.mark.parametrize("stage", STAGES)
async def test_each_action_at_each_stage(
    backend: RecordingBackend, start_proxy: Any, tmp_path: Path, stage: str
) -> None:
    write_rules(tmp_path / "rules")
    proxy = await start_proxy({"rules": str(tmp_path / "rules"), **QUIET})
    where = STAGES.index(stage)

    codes, text = await send(proxy, f"reject-{stage}@sender.example")
    assert codes[where] == 554 and text == "5.7.1 Refused by rule", (codes, text)
    codes, text = await send(proxy, f"tempfail-{stage}@sender.example")
    assert codes[where] == 450 and text == "4.7.1 Deferred by rule", (codes, text)
    assert backend.messages == []

    codes, _ = await send(proxy, f"discard-{stage}@sender.example")
    assert codes == [250, 250, 250]
    assert backend.messages == []

    codes, _ = await send(proxy, f"quarantine-{stage}@sender.example")
    assert codes == [250, 250, 250]
    assert f"X-Smtpproxy-Quarantine: quarantine_{stage}\r\n".encode() in backend.messages[-1].content

    codes, _ = await send(proxy, f"add_header-{stage}@sender.example")
    assert codes == [250, 250, 250]
    assert f"X-Rule-Hit: {stage}\r\n".encode() in backend.messages[-1].content

    codes, _ = await send(proxy, "clean@sender.example")
    assert codes == [250, 250, 250] and b"X-Rule-Hit" not in backend.messages[-1].content
    hits = proxy.app.metrics.registry.get_sample_value
    assert hits("smtpproxy_rule_hits_total", {"rule": f"reject_{stage}"}) == 1


async def test_quarantine_to_a_maildir(backend: RecordingBackend, start_proxy: Any, tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    maildir = tmp_path / "quarantine"
    (folder / "q.yaml").write_text(
        f"- name: q\n  if: {{subject: {{contains: suspicious}}}}\n  then: {{quarantine: {{to: 'maildir:{maildir}'}}}}\n"
    )
    proxy = await start_proxy({"rules": str(folder), **QUIET})
    codes, _ = await send(proxy, "a@sender.example", make_message(subject="suspicious offer"))
    assert codes == [250, 250, 250]
    assert backend.messages == []
    stored = [read_file(e.path) for e in os.scandir(maildir / "new")]
    assert len(stored) == 1 and b"X-Smtpproxy-Quarantine: q" in stored[0]


async def test_shipped_rules_reject_an_executable_through_the_proxy(
    backend: RecordingBackend, start_proxy: Any
) -> None:
    shipped = SHIPPED
    proxy = await start_proxy({"rules": str(shipped), **QUIET})
    eml = read_file(shipped / "samples" / "double-extension.eml")
    codes, text = await send(proxy, "billing@sender.example", eml)
    assert codes[-1] == 554 and text.startswith("5.7.1 Executable attachments")
    codes, _ = await send(
        proxy, "billing@sender.example", read_file(shipped / "samples" / "clean-attachments.eml")
    )
    assert codes == [250, 250, 250] and len(backend.messages) == 1


async def test_hot_reload_under_load(backend: RecordingBackend, start_proxy: Any, tmp_path: Path) -> None:
    folder = tmp_path / "rules"
    folder.mkdir()
    rule = "- name: version\n  then: {{add_header: {{name: X-Rules-Version, value: 'v{n}'}}}}\n"
    (folder / "10-v.yaml").write_text(rule.format(n=0))
    proxy = await start_proxy({"rules": str(folder), "rules_options": {"reload_interval": 0.02}, **QUIET})
    engine = proxy.app.rules
    failures: list[Any] = []
    stop = asyncio.Event()

    async def sender() -> int:
        sent = 0
        while not stop.is_set() and sent < 400:
            codes, text = await send(proxy, "load@sender.example")
            if codes != [250, 250, 250]:
                failures.append((codes, text))
            sent += 1
        return sent

    senders = [asyncio.create_task(sender()) for _ in range(3)]
    for n in range(1, 6):
        (folder / "10-v.yaml").write_text(rule.format(n=n))
        engine.reload()  # as SIGHUP would; the watcher also sees the change
        await asyncio.sleep(0.05)
    (folder / "10-v.yaml").write_text("- name: [broken\n")
    assert engine.reload() is False
    await asyncio.sleep(0.05)
    stop.set()
    sent = sum(await asyncio.gather(*senders))
    assert failures == [] and sent > 0
    versions = [m.content.split(b"X-Rules-Version: ")[1][:2] for m in backend.messages]
    assert versions[0] in (b"v0", b"v1") and b"v5" in versions
    # The malformed file did not replace v5: new transactions still get v5.
    await send(proxy, "after@sender.example")
    assert b"X-Rules-Version: v5" in backend.messages[-1].content
    sample = proxy.app.metrics.registry.get_sample_value
    assert sample("smtpproxy_rule_reloads_total", {"outcome": "failure"}) >= 1
