"""Message facts are computed in layers, once per transaction, and only as far as the rules read."""

from __future__ import annotations

import ipaddress
import textwrap
from email.message import EmailMessage
from pathlib import Path

import pytest

from smtpproxy.metrics import Metrics
from smtpproxy.rules import RulesEngine, facts
from smtpproxy.rules.facts import MessageFacts
from smtpproxy.rules.mime import parse_body
from smtpproxy.rules.txnstate import rule_matches
from smtpproxy.session import Session, Transaction


def facts_of(txn: Transaction) -> MessageFacts:
    """The rules' cached facts of ``txn``'s message."""
    return txn.state.get(MessageFacts)


def newsletter() -> bytes:
    m = EmailMessage()
    m["From"] = "=?utf-8?q?Caf=C3=A9?= <news@shop.example>"
    m["Subject"] = "offers"
    m.set_content("see https://shop.example/plain\n")
    m.add_alternative("<p>cheap <a href='https://Link.Example/x'>x</a></p>", subtype="html")
    m.add_attachment(b"MZ\x90\x00", maintype="application", subtype="octet-stream", filename="a.exe")
    return m.as_bytes().replace(b"\n", b"\r\n")


async def run_rules(tmp_path: Path, rules: str) -> Transaction:
    (tmp_path / "10-rules.yaml").write_text(textwrap.dedent(rules))
    engine = RulesEngine(tmp_path, Metrics(process=False))
    engine.load()
    session = Session("S", ipaddress.ip_address("192.0.2.10"), 4000, "127.0.0.1", 25, helo="mx.example.net")
    txn = Transaction("T", "news@shop.example")
    await engine.check.mail(session, txn)
    txn.message = newsletter()
    await engine.check.data(session, txn)
    return txn


async def test_attachment_rules_do_not_decode_the_text(tmp_path: Path) -> None:
    txn = await run_rules(
        tmp_path,
        """
        - name: exe
          if: {attachment.extension: exe}
          then: {score: 1}
        """,
    )
    assert txn.matched_rules == ["exe"]
    assert facts_of(txn).body is not None
    assert facts_of(txn).body_text is None and facts_of(txn).urls is None


async def test_text_rules_do_not_look_for_urls(tmp_path: Path) -> None:
    txn = await run_rules(
        tmp_path,
        """
        - name: cheap
          if: {body: {contains: cheap}}
          then: {score: 1}
        """,
    )
    assert txn.matched_rules == ["cheap"]
    assert facts_of(txn).body_text is not None and facts_of(txn).urls is None


async def test_url_rules_read_links_of_the_html_part(tmp_path: Path) -> None:
    txn = await run_rules(
        tmp_path,
        """
        - name: cheap
          if: {body: {contains: cheap}}
          then: {score: 1}
        - name: link
          if: {url.domain: link.example}
          then: {score: 1}
        - name: cafe
          if: {from.name: Café}
          then: {score: 1}
        """,
    )
    assert txn.matched_rules == ["cheap", "link", "cafe"]
    assert rule_matches(txn)[1]["value"] == "link.example"


def test_layers_give_the_facts_of_parse_body() -> None:
    txn = Transaction("T", "a@b.example", message=newsletter())
    whole = parse_body(txn.message)
    assert facts.body_text(txn).text == whole.text
    assert facts.body_urls(txn) == (whole.urls, whole.url_domains)
    assert facts.body_parts(txn).attachments == whole.attachments
    assert whole.urls == ("https://Link.Example/x", "https://shop.example/plain")
    assert facts.headers(txn)["subject"] == ("offers",)
    assert facts.from_field(txn) == (("Café",), ("news@shop.example",))


@pytest.mark.parametrize("txn", [None, Transaction("T", "a@b.example")])
def test_no_message_no_facts(txn: Transaction | None) -> None:
    assert facts.headers(txn) == {} and facts.header_fields(txn) == []
    assert facts.from_field(txn) == ((), ())
    assert facts.body_parts(txn).attachments == () and facts.body_text(txn).text == ""
    assert facts.body_urls(txn) == ((), ())
    if txn is not None:
        assert txn.state.peek(facts.MessageFacts) is None  # nothing cached before DATA
