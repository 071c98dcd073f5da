"""The proxy and ``smtpproxy check`` cannot disagree: one policy core, two drivers, same decisions.

Generated sessions and messages, against the shipped rules and against
generated rule sets, go once through the running proxy (a real client, a
recording backend) and once through ``smtpproxy check`` (the offline driver)
with the same configuration. The action, the client's reply and the header
fields added must be the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from smtpproxy.checkcmd import run_check
from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, dot_stuff

SHIPPED = Path(__file__).resolve().parent.parent / "smtpproxy" / "data" / "rules"
SAMPLES = SHIPPED / "samples"

HELOS = ["mx1.sender.example", "DESKTOP-4F2A", "[192.0.2.7]"]
SENDERS = ["a@sender.example", "", "boss@partner.example"]
RECIPIENTS = ["user@example.org", "other@example.org", "victim@elsewhere.example", "user%x@example.org"]
SUBJECTS = ["hello", "FREE money now", "Invoice 42"]


def plain_message(subject: str) -> bytes:
    return (
        f"From: Someone <a@sender.example>\r\nTo: user@example.org\r\nSubject: {subject}\r\n"
        "Date: Mon, 03 Jun 2024 10:00:00 +0000\r\nMessage-ID: <d1@sender.example>\r\n\r\nHello there.\r\n"
    ).encode()


def sample(name: str) -> bytes:
    return (SAMPLES / name).read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


MESSAGES = [plain_message(s) for s in SUBJECTS] + [
    sample(n) for n in sorted(p.name for p in SAMPLES.glob("*.eml"))
]

CONDITIONS: dict[str, list[dict[str, Any]]] = {
    "connect": [{"client.ip": {"cidr": ["127.0.0.0/8"]}}, {"client.ip": {"cidr": ["192.0.2.0/24"]}}],
    "helo": [{"helo": h} for h in HELOS],
    "mail": [{"mail_from.domain": "partner.example"}, {"mail_from": {"exists": False}}],
    "rcpt": [{"rcpt.local": "other"}, {"rcpt.domain": "example.org"}],
    "data": [
        {"subject": {"contains": "free"}},
        {"attachment.extension": "exe"},
        {"body": {"contains": "hello"}},
    ],
}
ACTIONS: list[Any] = [
    "accept",
    {"reject": {"code": 554, "enhanced": "5.7.1", "text": "Refused by rule"}},
    {"tempfail": {"code": 450, "enhanced": "4.7.1", "text": "Deferred by rule"}},
    "discard",
    "quarantine",
    {"score": 6},
    {"score": 20},
    {"add_header": {"name": "X-Rule", "value": "hit"}},
    {"tag_subject": "[TAG]"},
    "stop",
]


@st.composite
def rule_sets(draw: st.DrawFn) -> list[dict[str, Any]] | None:
    """None for the shipped rules, else one to four generated rules."""
    if draw(st.booleans()):
        return None
    rules = []
    for i in range(draw(st.integers(1, 4))):
        stage = draw(st.sampled_from(list(CONDITIONS)))
        action = draw(st.sampled_from(ACTIONS))
        # What a message needs (discard, quarantine, a subject) waits for one.
        if stage in ("connect", "helo") and action in ("discard", "quarantine"):
            action = {"score": 6}
        if stage != "data" and action == {"tag_subject": "[TAG]"}:
            action = {"score": 6}
        rules.append(
            {"name": f"g{i}", "stage": stage, "if": draw(st.sampled_from(CONDITIONS[stage])), "then": action}
        )
    return rules


def write_folder(folder: Path, rules: list[dict[str, Any]] | None) -> None:
    if rules is None:
        shutil.copytree(SHIPPED, folder)
    else:
        folder.mkdir()
        (folder / "10-generated.yaml").write_text(json.dumps({"rules": rules}))


async def through_proxy(
    proxy: Any, backend: RecordingBackend, helo: str, sender: str, rcpts: list[str], message: bytes
) -> dict[str, Any]:
    """What a real client sees, and what the backend got."""
    backend.messages.clear()
    out: dict[str, Any] = {"rcpts": []}
    async with RawClient(proxy.host, proxy.port) as c:
        banner = await c.connect()
        if banner.code != 220:
            return {**out, "final": (banner.code, banner.text), "stage": "connect"}
        r = await c.cmd(f"EHLO {helo}")
        if r.code != 250:
            return {**out, "final": (r.code, r.text), "stage": "helo"}
        r = await c.cmd(f"MAIL FROM:<{sender}>")
        if r.code != 250:
            return {**out, "final": (r.code, r.text), "stage": "mail"}
        last_refusal = None
        for rcpt in rcpts:
            r = await c.cmd(f"RCPT TO:<{rcpt}>")
            out["rcpts"].append(r.code)
            if r.code != 250:
                last_refusal = (r.code, r.text)
        if 250 not in out["rcpts"]:
            return {**out, "final": last_refusal, "stage": "rcpt"}
        assert (await c.cmd("DATA")).code == 354
        r = await c.cmd(dot_stuff(message) + b".")
        out.update(final=(r.code, r.text), stage="data")
    if backend.messages:
        out["delivered"] = backend.messages[0].content
    return out


def added_fields(delivered: bytes, original: bytes) -> list[str]:
    """Header fields in the delivered message that the original did not have (Received aside)."""

    def fields(message: bytes) -> list[str]:
        head = message.split(b"\r\n\r\n", 1)[0].decode("utf-8", "replace")
        unfolded = head.replace("\r\n\t", " ").replace("\r\n ", " ")
        return unfolded.split("\r\n")

    before = fields(original)
    return [f for f in fields(delivered) if f not in before and not f.lower().startswith("received:")]


WORDS = {
    "continue": "delivered",
    "accept": "delivered",
    "quarantine": "quarantined",
    "discard": "discarded",
    "reject": "rejected",
    "tempfail": "tempfailed",
}


def counted(counter: Any) -> list[tuple[str, ...]]:
    """The (action, stage, reason) label sets of ``smtpproxy_messages_total`` that counted something."""
    return [
        (s.labels["action"], s.labels["stage"], s.labels["reason"])
        for metric in counter.collect()
        for s in metric.samples
        if s.name.endswith("_total") and s.value > 0
    ]


COMPARED: list[int] = []  # how many generated cases ran (for the note)


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    rules=rule_sets(),
    helo=st.sampled_from(HELOS),
    sender=st.sampled_from(SENDERS),
    rcpts=st.tuples(st.sampled_from(RECIPIENTS[:2]), st.lists(st.sampled_from(RECIPIENTS), max_size=2)).map(
        lambda t: [t[0], *t[1]]
    ),
    message=st.sampled_from(MESSAGES),
)
async def test_proxy_and_check_decide_the_same(
    backend: RecordingBackend,
    start_proxy,
    tmp_path_factory,
    rules: list[dict[str, Any]] | None,
    helo: str,
    sender: str,
    rcpts: list[str],
    message: bytes,
) -> None:
    folder = tmp_path_factory.mktemp("rules") / "rules"
    write_folder(folder, rules)
    proxy = await start_proxy({"rules": str(folder), "rules_options": {"reload_interval": 0}})
    seen = await through_proxy(proxy, backend, helo, sender, rcpts, message)
    checked = await run_check(
        proxy.app.config, message, client_ip="127.0.0.1", helo=helo, mail_from=sender, rcpts=rcpts
    )
    await proxy.app.stop(grace=0)
    COMPARED.append(1)
    context = (rules, helo, sender, rcpts, seen.get("final"), checked)

    # The proxy logged and counted the transaction as check reports it.
    if checked["stage"] in ("mail", "data"):
        assert counted(proxy.app.metrics.messages) == [
            (WORDS[checked["action"]], checked["stage"], checked["reason"])
        ], context

    # The same recipients were accepted and refused.
    check_rcpts = [250 if r["action"] == "continue" else int(r["reply"][:3]) for r in checked["recipients"]]
    if seen["stage"] in ("rcpt", "data"):
        assert seen["rcpts"] == check_rcpts, context
    assert seen["stage"] == checked["stage"], context

    code, text = seen["final"]
    check_code, _, check_text = checked["reply"].partition(" ")
    if checked["action"] in ("reject", "tempfail"):
        # The very same reply, word for word.
        assert (code, text) == (int(check_code), check_text), context
        assert "delivered" not in seen, context
        return
    assert code == 250, context
    if checked["action"] == "discard":
        assert "delivered" not in seen and checked["headers_added"] == [], context
        return
    delivered = seen["delivered"]
    expected = [h for h in checked["headers_added"] if not h.lower().startswith("received:")]
    got = added_fields(delivered, message)
    # Subject tags change a field rather than add one: both sides show the same new Subject.
    assert sorted(f for f in got if not f.lower().startswith("subject:")) == sorted(expected), context
