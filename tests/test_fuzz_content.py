"""Content fuzzing: broken real-world message shapes through every content check.

SPF, DKIM, ARC, DMARC, Authentication-Results editing, the MIME walker and the
shipped rules (plus rules reading every body field) all see generated
malformed messages. No exception may escape a check (the pipeline would count
it in ``smtpproxy_check_errors_total`` and tempfail), and no check may run into
the check timeout.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from smtpproxy.app import App
from smtpproxy.config import build_config
from smtpproxy.headers import apply_edits, remove_fields_where
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.stages import Stage
from smtpproxy.verdict import Action
from tests.dnsserver import DnsServer

ROOT = Path(__file__).resolve().parent.parent

BODY_RULES = """
- name: fuzz_body
  stage: data
  if: {any: [{body: {contains: "viagra"}}, {url.domain: {ends_with: ".example"}},
             {attachment.extension: {in_list: [exe, js]}}, {archive.extension: {in_list: [exe]}},
             {header.subject: {regex: "(?i)win.*prize"}}, {from.name: {contains: "bank"}}]}
  then: {score: 1}
"""


def _zip(names: list[str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in names:
            z.writestr(name, b"x")
    return buf.getvalue()


header_lines = st.sampled_from(
    [
        b"From: Bank <bank@sender.example>",
        b"From: a@b.example, c@d.example",
        b"From: =?utf-8?b?QmFuaw==?= <x@sender.example>",
        b"From: =?bogus?q?broken",
        b"From:",
        b"Subject: =?utf-8?q?You_win_a_prize?=",
        b"Subject: \xff\xfe 8-bit junk",
        b"Subject: x" + b"y" * 3000,
        b"DKIM-Signature: v=1; a=rsa-sha256; d=sender.example; s=sel; h=from; bh=AAAA; b=BBBB",
        b"DKIM-Signature: garbage ;;; ===",
        b"DKIM-Signature: v=1; a=ed25519-sha256; d=; s=; b=",
        b"ARC-Seal: i=1; a=rsa-sha256; cv=none; d=fwd.example; s=arc; b=AAAA",
        b"ARC-Message-Signature: i=x; garbage",
        b"ARC-Authentication-Results: i=1; junk",
        b"Authentication-Results: mx.test.example; spf=pass smtp.mailfrom=forged",
        b"Authentication-Results: mx.test.example (comment; spf=pass",
        b"Authentication-Results: other.example; dkim=pass",
        b"Authentication-Results: ;;;",
        b'Content-Type: multipart/mixed; boundary="b1"',
        b"Content-Type: multipart/alternative; boundary=",
        b"Content-Type: text/html; charset=unknown-8bit",
        b"Content-Type: message/rfc822",
        b"Content-Transfer-Encoding: base64",
        b"Content-Transfer-Encoding: quoted-printable",
        b"MIME-Version: 1.0",
        b" folded continuation without a field",
        b"No colon here",
        b"X-Null: a\x00b",
    ]
)

body_parts = st.sampled_from(
    [
        b"plain text viagra\r\n",
        b"<html><a href='http://spam.example/x'>click</a><script>x</script></html>\r\n",
        b"--b1\r\nContent-Type: text/plain\r\n\r\nhello\r\n",
        b'--b1\r\nContent-Type: application/octet-stream; name="invoice.pdf.exe"\r\n'
        b"Content-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"MZ\x90\x00" * 10).replace(b"\n", b"\r\n"),
        b"--b1\r\nContent-Type: application/zip; name=a.zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(_zip(["inner/evil.exe", "ok.txt"])).replace(b"\n", b"\r\n"),
        b"--b1\r\nContent-Type: application/zip; name=bad.zip\r\nContent-Transfer-Encoding: base64\r\n\r\n"
        + base64.encodebytes(b"PK\x03\x04 not really a zip").replace(b"\n", b"\r\n"),
        b"--b1--\r\n",
        b"--b1\r\n--b1\r\n",
        b"=E9t=E9 =\r\n=ZZ broken qp\r\n",
        b"!!!! not base64 ****\r\n",
        b"\xc3\xa9\xff\xfe raw 8-bit\r\n",
        b".\r\n..\r\n",
        b"\r\n",
    ]
)

messages = st.builds(
    lambda head, body: b"\r\n".join(head) + b"\r\n\r\n" + b"".join(body),
    st.lists(header_lines, max_size=10),
    st.lists(body_parts, max_size=8),
)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[App, asyncio.AbstractEventLoop]]:
    tmp = tmp_path_factory.mktemp("fuzzcontent")
    rules = tmp / "rules"
    shutil.copytree(ROOT / "smtpproxy" / "data" / "rules", rules)
    (rules / "99-fuzz.yaml").write_text(BODY_RULES)
    dns = DnsServer(
        {
            "sender.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
            "_dmarc.sender.example": [("TXT", "v=DMARC1; p=reject")],
            "sel._domainkey.sender.example": [("TXT", "v=DKIM1; k=rsa; p=MIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8A")],
        }
    )
    dns.start()
    config = build_config(
        {
            "hostname": "mx.test.example",
            "relay_domains": ["example.org"],
            "rules": str(rules),
            "metrics": None,
            "dns": {"nameservers": [dns.address], "timeout": 2.0, "reverse_lookup": False},
            "check_timeout": 5,
        },
        base_dir=tmp,
    )
    loop = asyncio.new_event_loop()
    yield App(config), loop
    loop.close()
    dns.stop()


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(message=messages)
def test_malformed_messages_never_break_a_check(
    app: tuple[App, asyncio.AbstractEventLoop], message: bytes
) -> None:
    proxy, loop = app

    async def run() -> None:
        session = Session(
            "S", ipaddress.ip_address("192.0.2.9"), 1, "127.0.0.1", 25, helo="h.example", esmtp=True
        )
        txn = Transaction("T", "a@sender.example")
        await proxy.pipeline.run(Stage.MAIL, session, txn)
        rcpt = Recipient("user@example.org")
        await proxy.pipeline.run(Stage.RCPT, session, txn, rcpt)
        txn.recipients.append(rcpt)
        txn.message = message
        outcome = await proxy.pipeline.run(Stage.DATA, session, txn)
        assert isinstance(outcome.action, Action)
        assert "spf" in txn.extras and "dmarc" in txn.extras, "the checks ran"
        event(f"action={outcome.action.word}")
        # Delivery-time header work must also hold on broken headers.
        cleaned = remove_fields_where(message, proxy.forged_ar)
        final = apply_edits(cleaned, outcome.header_edits, prepend=b"Received: x\r\n")
        assert final.endswith(message.partition(b"\r\n\r\n")[2])

    loop.run_until_complete(run())
    errors = {
        (s.labels["check"], s.labels["kind"]): s.value
        for family in proxy.metrics.check_errors.collect()
        for s in family.samples
        if s.name.endswith("_total") and s.value
    }
    assert errors == {}, f"a check raised or timed out: {errors}"
