"""RulesCheck across stages, score thresholds, reload and the watcher, DNSBL, CLI, shipped rules."""

from __future__ import annotations

import asyncio
import gc
import io
import ipaddress
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from smtpproxy.config import ScoresConfig, build_config
from smtpproxy.dns import Resolver
from smtpproxy.metrics import Metrics
from smtpproxy.rules import RulesEngine, RulesError, build_rules_engine
from smtpproxy.rules.check import dnsbl_name
from smtpproxy.rules.cli import cmd_rules_check, cmd_rules_test
from smtpproxy.rules.testing import run_rule_tests, run_rule_tests_async
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.verdict import Action, HeaderEdit, HeaderEditKind, Verdict
from tests.dnsserver import DnsServer

REPO_RULES = Path(__file__).resolve().parent.parent / "smtpproxy" / "data" / "rules"
CLEAN = b"From: a@example.net\r\nSubject: hello\r\nDate: Mon, 3 Jun 2024 10:00:00 +0000\r\nMessage-ID: <x@y>\r\n\r\nhi\r\n"


def engine_for(tmp_path: Path, text: str, scores: ScoresConfig | None = None) -> RulesEngine:
    (tmp_path / "10-rules.yaml").write_text(textwrap.dedent(text))
    engine = RulesEngine(tmp_path, Metrics(process=False), scores=scores)
    engine.load()
    return engine


def new_session(ip: str = "192.0.2.10") -> Session:
    return Session("S", ipaddress.ip_address(ip), 4000, "127.0.0.1", 25, helo="mx.example.net")


def hits(engine: RulesEngine, rule: str) -> float:
    value = engine.metrics.registry.get_sample_value("smtpproxy_rule_hits_total", {"rule": rule})
    return value or 0.0


async def test_reject_at_mail_answers_with_the_rules_reply(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - name: block_sender
          stage: mail
          if: {mail_from.domain: {in_list: [spam.example], subdomains: true}}
          then: {reject: {code: 550, enhanced: "5.7.1", text: "Sender domain blocked"}}
        """,
    )
    session, txn = new_session(), Transaction("T", "x@mail.spam.example")
    verdict = await engine.check.mail(session, txn)
    assert isinstance(verdict, Verdict) and verdict.action is Action.REJECT
    assert str(verdict.reply) == "550 5.7.1 Sender domain blocked"
    assert verdict.reasons == ("block_sender",)
    assert txn.matched_rules == ["block_sender"]
    assert txn.extras["rule_matches"][0]["field"] == "mail_from.domain"
    assert txn.extras["rule_matches"][0]["value"] == "mail.spam.example (list (inline): spam.example)"
    assert hits(engine, "block_sender") == 1
    assert await engine.check.mail(session, Transaction("T2", "x@ham.example")) is None


async def test_rcpt_reject_refuses_only_that_recipient(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - name: no_noreply
          stage: rcpt
          if: {rcpt.local: noreply}
          then: {reject: {code: 550, enhanced: "5.1.1", text: "No such user"}}
        """,
    )
    session, txn = new_session(), Transaction("T", "a@b.example")
    await engine.check.mail(session, txn)
    refused = await engine.check.rcpt(session, txn, Recipient("noreply@example.org"))
    assert isinstance(refused, Verdict) and refused.reply is not None and refused.reply.code == 550
    assert await engine.check.rcpt(session, txn, Recipient("user@example.org")) is None


async def test_discard_and_header_edits_decided_early_are_answered_at_data(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - name: tag_it
          stage: mail
          if: {mail_from.local: {starts_with: news}}
          then: [{add_header: {name: X-Newsletter, value: "yes"}}, {tag_subject: "[NEWS]"}]
        - name: drop_it
          stage: rcpt
          if: {rcpt: blackhole@example.org}
          then: discard
        - name: never_reached
          if: {size: {gt: 0}}
          then: reject
        """,
    )
    session, txn = new_session(), Transaction("T", "newsletter@shop.example")
    assert await engine.check.mail(session, txn) is None
    assert await engine.check.rcpt(session, txn, Recipient("blackhole@example.org")) is None
    txn.recipients.append(Recipient("blackhole@example.org"))
    txn.message = CLEAN
    verdict = await engine.check.data(session, txn)
    assert isinstance(verdict, Verdict) and verdict.action is Action.DISCARD
    assert verdict.reasons == ("drop_it",)
    assert verdict.header_edits == (
        HeaderEdit(HeaderEditKind.ADD, "X-Newsletter", "yes"),
        HeaderEdit(HeaderEditKind.SUBJECT_TAG, "Subject", "[NEWS]"),
    )
    assert txn.matched_rules == ["tag_it", "drop_it"]


async def test_quarantine_carries_destination_and_marking_header(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - name: bad_links
          if: {url.domain: {in_list: [phish.example], subdomains: true}}
          then: {quarantine: {to: "maildir:/var/quarantine"}}
        """,
    )
    session, txn = (
        new_session(),
        Transaction("T", "a@b.example", message=b"Subject: x\r\n\r\nhttp://login.phish.example/a\r\n"),
    )
    verdict = await engine.check.data(session, txn)
    assert isinstance(verdict, Verdict) and verdict.action is Action.QUARANTINE
    assert verdict.quarantine_to == "maildir:/var/quarantine"
    assert HeaderEdit(HeaderEditKind.ADD, "X-Smtpproxy-Quarantine", "bad_links") in verdict.header_edits


async def test_accept_at_connect_for_trusted_network(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "trusted.txt").write_text("2001:db8:aa::/48\n")
    engine = engine_for(
        tmp_path,
        """
        - name: allow_partner
          stage: connect
          if: {client.ip: {in_list: trusted}}
          then: accept
        """,
    )
    verdict = await engine.check.connect(new_session("2001:db8:aa::5"))
    assert isinstance(verdict, Verdict) and verdict.action is Action.ACCEPT
    assert await engine.check.connect(new_session("2001:db8:bb::5")) is None


async def test_stop_ends_evaluation_without_an_action(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - name: first
          then: [{score: 1}, stop]
        - name: second
          then: {score: 100}
        """,
    )
    txn = Transaction("T", "a@b.example", message=CLEAN)
    verdict = await engine.check.data(new_session(), txn)
    assert isinstance(verdict, Verdict) and verdict.action is Action.CONTINUE
    assert txn.score == 1 and txn.matched_rules == ["first"]


async def test_first_terminal_rule_wins(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "- name: a\n  then: {tempfail: 'later'}\n- name: b\n  then: reject\n")
    verdict = await engine.check.data(new_session(), Transaction("T", "a@b", message=CLEAN))
    assert isinstance(verdict, Verdict) and verdict.action is Action.TEMPFAIL and verdict.reasons == ("a",)


async def test_score_thresholds_add_headers_then_reject(tmp_path: Path) -> None:
    text = "- name: s\n  if: {subject: {contains: cheap}}\n  then: {score: 6}\n"
    engine = engine_for(
        tmp_path, text + "- name: t\n  if: {subject: {contains: pills}}\n  then: {score: 10}\n"
    )
    txn = Transaction("T", "a@b", message=b"Subject: cheap watches\r\n\r\nx")
    verdict = await engine.check.data(new_session(), txn)
    assert isinstance(verdict, Verdict) and verdict.action is Action.CONTINUE
    assert HeaderEdit(HeaderEditKind.ADD, "X-Spam-Flag", "YES") in verdict.header_edits
    assert HeaderEdit(HeaderEditKind.ADD, "X-Spam-Score", "6.0") in verdict.header_edits
    assert verdict.score == 0  # already added to txn.score; the pipeline must not add it twice
    txn = Transaction("T", "a@b", message=b"Subject: cheap pills\r\n\r\nx")
    verdict = await engine.check.data(new_session(), txn)
    assert isinstance(verdict, Verdict) and verdict.action is Action.REJECT
    assert str(verdict.reply) == "550 5.7.1 Message rejected as spam" and verdict.reasons == ("score",)


async def test_connection_score_carries_into_each_transaction(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        "- name: bad_helo\n  stage: helo\n  if: {helo: {regex: '^[^.]+$'}}\n  then: {score: 2}\n",
        scores=ScoresConfig(add_header=1.0, reject=None),
    )
    session = new_session()
    session.helo = "DESKTOP"
    await engine.check.helo(session)
    for _ in range(2):
        txn = Transaction("T", "a@b", message=CLEAN)
        await engine.check.mail(session, txn)
        verdict = await engine.check.data(session, txn)
        assert txn.score == 2 and txn.matched_rules == ["bad_helo"]
        assert isinstance(verdict, Verdict)
        assert HeaderEdit(HeaderEditKind.ADD, "X-Spam-Score", "2.0") in verdict.header_edits


async def test_transaction_keeps_its_rules_across_a_reload(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "- name: old_rule\n  then: reject\n")
    session, txn = new_session(), Transaction("T", "a@b")
    await engine.check.mail(session, txn)
    (tmp_path / "10-rules.yaml").write_text("- name: new_rule\n  then: {score: 1}\n")
    assert engine.reload() is True
    txn.message = CLEAN
    verdict = await engine.check.data(session, txn)
    assert isinstance(verdict, Verdict) and verdict.reasons == ("old_rule",)
    fresh = Transaction("T2", "a@b", message=CLEAN)
    await engine.check.mail(session, fresh)
    await engine.check.data(session, fresh)
    assert fresh.matched_rules == ["new_rule"]


def test_a_replaced_ruleset_is_freed_without_the_cycle_collector() -> None:
    # The server freezes its startup heap (cli.tune_gc): frozen objects are only
    # freed by reference counting, so an old ruleset must hold no reference cycle.
    engine = RulesEngine(REPO_RULES, Metrics(process=False))
    engine.load()
    gc.collect()
    gc.disable()
    try:
        assert engine.reload() is True
        assert gc.collect() == 0  # nothing of the old rules was left to the collector
    finally:
        gc.enable()


def test_failed_reload_keeps_the_old_rules_and_counts(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = engine_for(tmp_path, "- name: keep_me\n  then: reject\n")
    before = engine.current
    (tmp_path / "10-rules.yaml").write_text("- name: broken\n  if: {nope: 1}\n  then: reject\n")
    assert engine.reload() is False
    assert engine.current is before
    assert engine.last_error is not None
    assert (
        engine.last_error.problems[0]
        .render()
        .startswith("10-rules.yaml:2: rule broken: unknown field 'nope'")
    )
    assert "10-rules.yaml:2: rule broken" in caplog.text
    sample = engine.metrics.registry.get_sample_value
    assert sample("smtpproxy_rule_reloads_total", {"outcome": "failure"}) == 1
    assert sample("smtpproxy_rule_reloads_total", {"outcome": "success"}) == 1
    assert sample("smtpproxy_rules_loaded") == 1


async def test_watcher_reloads_a_changed_file(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, "- name: v1\n  then: stop\n")
    task = asyncio.create_task(engine.watch(0.02))
    try:
        (tmp_path / "20-more.yaml").write_text("- name: v2\n  then: stop\n")
        for _ in range(500):
            if [r.name for r in engine.current.rules] == ["v1", "v2"]:
                break
            await asyncio.sleep(0.02)
        assert [r.name for r in engine.current.rules] == ["v1", "v2"]
        (tmp_path / "20-more.yaml").write_text("- name: [broken\n")
        for _ in range(500):
            if engine.last_error is not None:
                break
            await asyncio.sleep(0.02)
        assert engine.last_error is not None and [r.name for r in engine.current.rules] == ["v1", "v2"]
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def test_build_rules_engine_refuses_a_bad_folder(tmp_path: Path) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.yaml").write_text("- name: x\n  then: explode\n")
    config = build_config({"rules": "rules"}, base_dir=tmp_path)
    with pytest.raises(RulesError) as info:
        build_rules_engine(config, None, Metrics(process=False))
    assert info.value.problems[0].render() == (
        "a.yaml:2: rule x: unknown action 'explode'; expected one of accept, reject, tempfail, discard, "
        "quarantine, ratelimit, stop, add_header, remove_header, tag_subject, score"
    )


@pytest.fixture
def dnsbl_server() -> Iterator[DnsServer]:
    server = DnsServer(
        {
            "10.2.0.192.zen.test": [("A", "127.0.0.2")],
            "10.2.0.192.bogus.test": [("A", "192.0.2.99")],
            dnsbl_name(ipaddress.ip_address("2001:db8::1"), "zen.test"): [("A", "127.0.0.4")],
        }
    )
    server.start()
    yield server
    server.stop()


async def test_dnsbl_lookup_through_the_resolver_is_cached(tmp_path: Path, dnsbl_server: DnsServer) -> None:
    (tmp_path / "10-rules.yaml").write_text(
        "- name: listed\n  stage: connect\n  if: {dnsbl: zen.test}\n  then: {reject: {code: 554, text: listed}}\n"
        "- name: bogus\n  stage: connect\n  if: {dnsbl: bogus.test}\n  then: reject\n"
    )
    resolver = Resolver([dnsbl_server.address], timeout=2.0)
    engine = RulesEngine(tmp_path, Metrics(process=False), resolver=resolver)
    engine.load()
    session = new_session("192.0.2.10")
    verdict = await engine.check.connect(session)
    assert isinstance(verdict, Verdict) and verdict.reply is not None and verdict.reply.code == 554
    assert session.extras["rules_dnsbl"] == {"zen.test": ("127.0.0.2",), "bogus.test": ()}
    assert await engine.check.connect(new_session("192.0.2.11")) is None
    v6 = await engine.check.connect(new_session("2001:db8::1"))
    assert isinstance(v6, Verdict) and v6.action is Action.REJECT
    await engine.check.connect(new_session("192.0.2.10"))
    assert dnsbl_server.count("10.2.0.192.zen.test", "A") == 1


def test_dnsbl_query_names() -> None:
    assert dnsbl_name(ipaddress.ip_address("192.0.2.10"), "zen.test") == "10.2.0.192.zen.test"
    v6 = dnsbl_name(ipaddress.ip_address("2001:db8::1"), "zen.test")
    assert v6.startswith("1.0.0.0.0.0.0.0") and v6.endswith("8.b.d.0.1.0.0.2.zen.test")


# -- inline tests, CLI, shipped rules ---------------------------------------------------


def test_shipped_rules_pass_their_inline_tests() -> None:
    report = run_rule_tests(REPO_RULES, scores=ScoresConfig())
    assert report.results and report.passed, report.render()
    files = {r.file for r in report.results}
    assert {p.name for p in REPO_RULES.glob("*.yaml")} <= files  # every shipped file has tests


def test_shipped_scores_together_stay_below_the_default_reject_threshold() -> None:
    from smtpproxy.rules.ruleset import load_ruleset

    ruleset = load_ruleset(REPO_RULES)
    total = sum(r.actions.score for r in ruleset.rules if r.actions.score > 0)
    reject = ScoresConfig().reject
    assert reject is not None and 0 < total < reject  # scoring alone never rejects with the defaults


async def test_a_failing_inline_test_is_reported(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        textwrap.dedent(
            """
            rules:
              - name: caps
                if: {subject: {regex: '^[A-Z ]+$', case_sensitive: true}}
                then: {score: 1}
            tests:
              - name: wrong expectation
                message: "Subject: HELLO\\n\\nx\\n"
                expect: {action: reject, rules: [caps, other]}
              - name: right expectation
                message: "Subject: HELLO\\n\\nx\\n"
                expect: {action: deliver, rules_exact: [caps]}
            """
        )
    )
    report = await run_rule_tests_async(tmp_path)
    assert [r.passed for r in report.results] == [False, True]
    assert report.results[0].failures == [
        "expected action reject, got continue",
        "expected rules ['other'] to match; matched ['caps']",
    ]
    text = report.render()
    assert "FAIL a.yaml:7: wrong expectation" in text and "1 passed, 1 failed" in text


def test_cli_rules_check_and_test(tmp_path: Path) -> None:
    config = build_config({})
    out = io.StringIO()
    assert cmd_rules_check(REPO_RULES, config, out) == 0
    assert out.getvalue().startswith("ok: ")
    out = io.StringIO()
    assert cmd_rules_test(REPO_RULES, config, out) == 0
    assert "0 failed" in out.getvalue()
    (tmp_path / "bad.yaml").write_text("- name: r\n  if: {subject: {gt: x}}\n  then: reject\n")
    out = io.StringIO()
    assert cmd_rules_check(tmp_path, config, out) == 2
    assert (
        out.getvalue()
        .splitlines()[0]
        .startswith(f"{tmp_path}/bad.yaml:2: rule r: subject: unknown operator 'gt'")
    )
    assert cmd_rules_test(tmp_path, config, io.StringIO()) == 2


def test_cli_rules_test_exits_1_on_failure_and_check_validates_tests(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        "rules:\n  - name: r\n    then: {score: 1}\ntests:\n  - name: t\n    message: 'Subject: x\\n\\nx'\n"
        "    expect: {action: reject}\n"
    )
    config = build_config({})
    assert cmd_rules_test(tmp_path, config, io.StringIO()) == 1
    (tmp_path / "a.yaml").write_text(
        "rules:\n  - name: r\n    then: {score: 1}\ntests:\n  - name: t\n    message: {file: missing.eml}\n"
        "    expect: {action: explode}\n"
    )
    out = io.StringIO()
    assert cmd_rules_check(tmp_path, config, out) == 2
    assert "a.yaml:6: test 't': test message missing.eml: No such file or directory" in out.getvalue()
    assert "expect.action: expected one of" in out.getvalue()


async def test_header_only_rules_never_parse_the_body(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - name: free_subject
          if: {subject: {regex: '^free'}}
          then: {score: 1}
        - name: from_shop
          if: {from.domain: shop.example}
          then: {score: 2}
        """,
    )
    session, txn = new_session(), Transaction("T", "a@shop.example")
    await engine.check.mail(session, txn)
    txn.message = (
        b"From: Shop <a@shop.example>\r\nSubject: =?utf-8?q?Free_caf=C3=A9?=\r\n"
        b"Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\n\r\nbody\r\n--b--\r\n"
    )
    await engine.check.data(session, txn)
    assert txn.matched_rules == ["free_subject", "from_shop"]
    assert "rules_body" not in txn.extras  # the MIME walk never ran


async def test_a_field_reader_that_raises_is_counted_and_logged_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A bug in a field reader must not pass silently as a rule that never matches."""
    import dataclasses

    from smtpproxy.rules import fields

    def broken(ctx: fields.EvalContext) -> tuple[str, ...]:
        raise RuntimeError("reader bug")

    # Our own code made to fail (no library mocked): the subject reader raises.
    monkeypatch.setitem(
        fields.FIELDS, "subject", dataclasses.replace(fields.FIELDS["subject"], extract=broken)
    )
    engine = engine_for(
        tmp_path,
        """
        - name: subject_rule
          if: {subject: {contains: hello}}
          then: {score: 3}
        """,
    )
    for _ in range(3):
        session, txn = new_session(), Transaction("T", "a@example.net")
        await engine.check.mail(session, txn)
        txn.message = CLEAN
        await engine.check.data(session, txn)
        assert "subject_rule" not in txn.matched_rules  # an unreadable fact is absent
    errors = engine.metrics.registry.get_sample_value(
        "smtpproxy_check_errors_total", {"check": "rules", "kind": "field"}
    )
    assert errors == 3
    logged = [r for r in caplog.records if "field subject could not be read" in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None
