"""The ``ratelimit`` rule action: parsing and errors, keys per stage, allowed then refused, inline tests."""

from __future__ import annotations

import io
import ipaddress
import textwrap
from pathlib import Path

import pytest

from smtpproxy.config import build_config
from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.check import build_ratelimiter
from smtpproxy.ratelimit.gcra import Rate
from smtpproxy.ratelimit.memory import MemoryStore
from smtpproxy.rules import RulesEngine, RulesError, load_ruleset
from smtpproxy.rules.cli import cmd_rules_check, cmd_rules_test
from smtpproxy.rules.engine import memory_limiter
from smtpproxy.rules.fields import EvalContext
from smtpproxy.rules.testing import run_rule_tests_async
from smtpproxy.rules.txnstate import TxnRules
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.stages import Stage
from smtpproxy.verdict import Action, HeaderEdit, HeaderEditKind, Reply, Verdict


def write(folder: Path, text: str) -> Path:
    folder.mkdir(exist_ok=True)
    (folder / "10-limits.yaml").write_text(textwrap.dedent(text))
    return folder


def problems(folder: Path, text: str) -> list[str]:
    write(folder, text)
    with pytest.raises(RulesError) as info:
        load_ruleset(folder)
    return [p.render() for p in info.value.problems]


def engine_for(folder: Path, text: str) -> RulesEngine:
    """An engine whose limiter has the clock stopped: counts are exact."""
    write(folder, text)
    metrics = Metrics(process=False)
    engine = RulesEngine(folder, metrics, limiter=memory_limiter(metrics, MemoryStore(64, clock=lambda: 0.0)))
    engine.load()
    return engine


def new_session(ip: str = "192.0.2.10", helo: str = "mx.example.net") -> Session:
    return Session("S", ipaddress.ip_address(ip), 4000, "127.0.0.1", 25, helo=helo)


def limit_hits(engine: RulesEngine, name: str) -> float:
    value = engine.metrics.registry.get_sample_value("smtpproxy_ratelimit_hits_total", {"limit": name})
    return value or 0.0


PER_DOMAIN = """
    - name: per_domain
      stage: mail
      if: {mail_from.domain: {exists: true}}
      then: [{ratelimit: {key: [mail_from.domain, client.ip], rate: 100/hour, burst: 2}},
             {score: 1}, {add_header: {name: X-Limited, value: "yes"}}]
"""


def test_a_ratelimit_action_compiles_with_stage_defaults(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
        - name: conn
          stage: connect
          then: {ratelimit: {key: client.ip, rate: 10/minute}}
        - name: mail
          stage: mail
          then: {ratelimit: {key: [mail_from.domain], rate: 5/hours, burst: 3, reply: "Slow down"}}
        - name: rcpt
          stage: rcpt
          then: {ratelimit: {key: rcpt, rate: 1/day, reply: {code: 452, enhanced: "4.5.3", text: "Later"}}}
        """,
    )
    conn, mail, rcpt = (r.actions.ratelimit for r in load_ruleset(tmp_path).rules)
    assert conn is not None and mail is not None and rcpt is not None
    assert conn.rate == Rate(10, "minute") and conn.burst == 10  # burst defaults to the count
    assert conn.reply == Reply(421, "4.7.0", "Rate limit conn exceeded, try again later")
    assert [f.name for f in mail.fields] == ["mail_from.domain"] and mail.burst == 3
    assert mail.reply == Reply(450, "4.7.1", "Slow down")
    assert rcpt.reply == Reply(452, "4.5.3", "Later")


def test_errors_name_the_file_line_and_what_was_expected(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        - name: a
          stage: mail
          then: {ratelimit: {key: [client_ip, header.x-foo], rate: 10/fortnight, burst: 0}}
        - name: b
          stage: rcpt
          then: {ratelimit: {key: rcpt, rate: 1/hour, reply: {code: 550}, per: x}}
        - name: c
          stage: rcpt
          then: {ratelimit: {key: rcpt, rate: 1/hour, reply: {code: 550}}}
        - name: d
          then: [reject, {ratelimit: {key: subject, rate: 1/hour}}]
        - name: e
          then: [{ratelimit: {key: subject, rate: 1/hour}}, tempfail]
        - name: f
          then: {ratelimit: 5/minute}
        - name: g
          then: {ratelimit: {key: [], rate: 1/hour}}
        """,
    )
    assert found == [
        "10-limits.yaml:4: rule a: ratelimit: key: unknown field 'client_ip' (did you mean 'client.ip'?); "
        "fields: see rules/README.md",
        "10-limits.yaml:4: rule a: ratelimit: key: field 'header.x-foo' is not known yet at stage mail; "
        "expected stage: data or later for this rule",
        "10-limits.yaml:4: rule a: ratelimit: rate: expected a rate like 60/minute "
        "(units: second, minute, hour, day), got '10/fortnight'",
        "10-limits.yaml:4: rule a: ratelimit: burst: expected a whole number >= 1, got 0",
        "10-limits.yaml:7: rule b: ratelimit: unknown keys ['per']; expected key, rate, burst, reply "
        "(key and rate required)",
        "10-limits.yaml:10: rule c: ratelimit: reply: code 550 is invalid; expected a 4xx reply code like 450",
        "10-limits.yaml:12: rule d: ratelimit: a rule has one ratelimit and no final action; "
        "it has the final action reject",
        "10-limits.yaml:14: rule e: tempfail: a rule with a ratelimit has no final action "
        "(over the limit it tempfails)",
        "10-limits.yaml:16: rule f: ratelimit: expected {key: [FIELD, ...], rate: N/minute, burst: N}, "
        "got '5/minute'",
        "10-limits.yaml:18: rule g: ratelimit: key: expected a field or a list of fields like "
        "[mail_from.domain, client.ip], got []",
    ]


def test_missing_rate_and_repeated_field(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        - name: a
          then: {ratelimit: {key: subject}}
        - name: b
          then: {ratelimit: {key: [subject, subject], rate: 1/hour}}
        """,
    )
    assert found == [
        "10-limits.yaml:3: rule a: ratelimit: missing rate; expected key, rate, burst, reply "
        "(key and rate required)",
        "10-limits.yaml:5: rule b: ratelimit: key: field 'subject' repeats; expected each field once",
    ]


def test_keys_per_stage(tmp_path: Path) -> None:
    write(
        tmp_path,
        """
        - {name: k_connect, stage: connect, then: {ratelimit: {key: client.ip, rate: 1/hour}}}
        - {name: k_helo, stage: helo, then: {ratelimit: {key: [helo, client.ip], rate: 1/hour}}}
        - {name: k_mail, stage: mail, then: {ratelimit: {key: [mail_from.local, mail_from.domain], rate: 1/hour}}}
        - {name: k_rcpt, stage: rcpt, then: {ratelimit: {key: [rcpt.domain, rcpt], rate: 1/hour}}}
        - {name: k_data, then: {ratelimit: {key: [rcpt, header.x-tenant, size], rate: 1/hour}}}
        """,
    )
    rules = {r.name: r.actions.ratelimit for r in load_ruleset(tmp_path).rules}
    session = new_session("2001:DB8::1", helo="MX.Example.NET")
    txn = Transaction("T", "Odd|User@Example.COM")
    txn.recipients = [Recipient("a@example.org"), Recipient("b,c@example.org")]
    txn.message = b"X-Tenant: Blue\r\nX-Tenant: red\r\n\r\nhi\r\n"

    def key(name: str, ctx: EvalContext) -> str:
        action = rules[name]
        assert action is not None
        return action.key(ctx)

    assert key("k_connect", EvalContext(session, None, Stage.CONNECT)) == "2001:db8::1"
    assert key("k_helo", EvalContext(session, None, Stage.HELO)) == "mx.example.net|2001:db8::1"
    assert key("k_mail", EvalContext(session, txn, Stage.MAIL)) == "odd\\|user|example.com"
    # At rcpt: only the recipient being checked, not the ones accepted before.
    rcpt_ctx = EvalContext(session, txn, Stage.RCPT, Recipient("New@Example.ORG"))
    assert key("k_rcpt", rcpt_ctx) == "example.org|new@example.org"
    # At data: every recipient and every occurrence, in order, separators escaped.
    data_key = key("k_data", EvalContext(session, txn, Stage.DATA))
    assert data_key == f"a@example.org,b\\,c@example.org|blue,red|{float(len(txn.message))}"


async def test_allowed_then_refused_with_the_reply_and_the_metric(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, PER_DOMAIN)
    session = new_session()
    for _ in range(2):
        txn = Transaction("T", "a@sender.example")
        assert await engine.check.mail(session, txn) is None
        assert txn.score == 1.0 and txn.matched_rules == ["per_domain"]  # the other actions apply
        verdict = await engine.check.data(session, txn)
        assert isinstance(verdict, Verdict)
        assert HeaderEdit(HeaderEditKind.ADD, "X-Limited", "yes") in verdict.header_edits
    txn = Transaction("T", "b@SENDER.example")  # same domain, other case: same bucket
    verdict = await engine.check.mail(session, txn)
    assert isinstance(verdict, Verdict) and verdict.action is Action.TEMPFAIL
    assert verdict.reply is not None
    assert verdict.reply.render() == "450 4.7.1 Rate limit per_domain exceeded, try again later"
    assert verdict.reasons == ("per_domain",) and not verdict.disconnect
    assert limit_hits(engine, "per_domain") == 1
    # Another domain, or the same domain from another client, has its own bucket.
    assert await engine.check.mail(session, Transaction("T", "a@other.example")) is None
    assert await engine.check.mail(new_session("192.0.2.99"), Transaction("T", "a@sender.example")) is None


async def test_rule_order_first_decision_wins(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - {name: vip, stage: mail, if: {mail_from: boss@sender.example}, then: accept}
        - {name: limit, stage: mail, then: {ratelimit: {key: mail_from.domain, rate: 1/hour, burst: 1}}}
        - {name: later, stage: mail, then: {score: 5}}
        - {name: second, stage: mail, then: {ratelimit: {key: mail_from.domain, rate: 1/hour, burst: 1}}}
        - {name: block, stage: mail, if: {mail_from.local: spam}, then: reject}
        """,
    )
    session = new_session()
    # An earlier final action decides before the limit is asked: no token is taken.
    assert isinstance(await engine.check.mail(session, Transaction("T", "boss@sender.example")), Verdict)
    txn = Transaction("T", "spam@sender.example")
    verdict = await engine.check.mail(session, txn)  # both limits allow: the later reject decides
    assert isinstance(verdict, Verdict) and verdict.action is Action.REJECT
    assert txn.matched_rules == ["limit", "later", "second", "block"]
    txn = Transaction("T", "a@sender.example")
    verdict = await engine.check.mail(session, txn)  # the first limit refuses: nothing after it runs
    assert isinstance(verdict, Verdict) and verdict.reasons == ("limit",)
    assert txn.matched_rules == ["limit"] and txn.score == 0
    assert limit_hits(engine, "limit") == 1 and limit_hits(engine, "second") == 0


async def test_connect_refusal_is_421_and_closes(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        "- {name: per_ip, stage: connect, then: {ratelimit: {key: client.ip, rate: 1/hour, burst: 1}}}",
    )
    assert await engine.check.connect(new_session()) is None
    verdict = await engine.check.connect(new_session())
    assert isinstance(verdict, Verdict) and verdict.action is Action.TEMPFAIL and verdict.disconnect
    assert verdict.reply == Reply(421, "4.7.0", "Rate limit per_ip exceeded, try again later")


async def test_client_net_key_counts_a_whole_network(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        "- {name: per_net, stage: connect, then: {ratelimit: {key: client.net, rate: 1/hour, burst: 2}}}",
    )
    assert await engine.check.connect(new_session("192.0.2.10")) is None
    assert await engine.check.connect(new_session("::ffff:192.0.2.200")) is None  # the same /24
    assert isinstance(await engine.check.connect(new_session("192.0.2.77")), Verdict)
    assert await engine.check.connect(new_session("198.51.100.1")) is None  # another network
    assert await engine.check.connect(new_session("2001:db8:1:2::1")) is None
    assert await engine.check.connect(new_session("2001:db8:1:2:ffff::9")) is None  # the same /64
    assert isinstance(await engine.check.connect(new_session("2001:db8:1:2::77")), Verdict)
    assert await engine.check.connect(new_session("2001:db8:1:3::1")) is None


async def test_client_net_as_a_condition(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        "- {name: bad_net, stage: connect, if: {client.net: {equals: 203.0.113.0/24}}, then: reject}",
    )
    assert isinstance(await engine.check.connect(new_session("203.0.113.9")), Verdict)
    assert await engine.check.connect(new_session("203.0.114.9")) is None


async def test_rcpt_limit_refuses_only_that_recipient(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - {name: per_rcpt, stage: rcpt, then: {ratelimit: {key: rcpt, rate: 1/hour, burst: 1}}}
        - {name: after, stage: rcpt, then: {score: 1}}
        """,
    )
    session, txn = new_session(), Transaction("T", "a@sender.example")
    assert await engine.check.rcpt(session, txn, Recipient("x@example.org")) is None
    txn.recipients.append(Recipient("x@example.org"))
    verdict = await engine.check.rcpt(session, txn, Recipient("X@example.org"))
    assert isinstance(verdict, Verdict) and verdict.reply is not None and verdict.reply.code == 450
    assert await engine.check.rcpt(session, txn, Recipient("y@example.org")) is None
    assert txn.score == 2  # "after" ran for the two allowed recipients only


async def test_stop_applies_when_the_limit_allows(tmp_path: Path) -> None:
    engine = engine_for(
        tmp_path,
        """
        - {name: lim, stage: mail, then: [{ratelimit: {key: mail_from, rate: 1/hour, burst: 1}}, stop]}
        - {name: after, stage: mail, then: {score: 1}}
        """,
    )
    session, txn = new_session(), Transaction("T", "a@sender.example")
    assert await engine.check.mail(session, txn) is None
    assert txn.matched_rules == ["lim"] and txn.state.get(TxnRules).done is True


async def test_fail_closed_store_refuses_and_fail_open_allows(tmp_path: Path) -> None:
    write(tmp_path, PER_DOMAIN)
    for fail, expected in (("open", None), ("closed", Action.TEMPFAIL)):
        # Nothing listens on port 9: the store cannot answer.
        config = build_config({"ratelimit_store": "redis://127.0.0.1:9/0", "ratelimit_fail": fail})
        metrics = Metrics(process=False)
        limiter = build_ratelimiter(config, metrics)
        engine = RulesEngine(tmp_path, metrics, limiter=limiter)
        engine.load()
        verdict = await engine.check.mail(new_session(), Transaction("T", "a@sender.example"))
        assert (verdict.action if isinstance(verdict, Verdict) else None) is expected
        await limiter.close()


INLINE = """
rules:
  - name: per_sender
    stage: mail
    then: {ratelimit: {key: mail_from, rate: 2/day, burst: 2}}
tests:
  - name: two pass
    repeat: 2
    expect: {action: deliver, rules: [per_sender]}
  - name: the third is deferred
    repeat: 3
    expect: {action: tempfail, code: 450, enhanced: "4.7.1"}
  - name: one alone is fine (each test counts on its own)
    expect: {action: deliver}
"""


async def test_inline_tests_repeat_a_message_against_a_fresh_limiter(tmp_path: Path) -> None:
    write(tmp_path, INLINE)
    report = await run_rule_tests_async(tmp_path)
    assert [r.passed for r in report.results] == [True, True, True], report.render()
    out = io.StringIO()
    assert cmd_rules_check(tmp_path, build_config({}), out) == 0, out.getvalue()
    assert "ok: 1 rules (mail 1)" in out.getvalue()


def test_rules_test_cli_and_bad_repeat(tmp_path: Path) -> None:
    write(tmp_path, INLINE)
    out = io.StringIO()
    assert cmd_rules_test(tmp_path, build_config({}), out) == 0, out.getvalue()
    write(tmp_path, INLINE.replace("repeat: 3", "repeat: 0"))
    out = io.StringIO()
    assert cmd_rules_check(tmp_path, build_config({}), out) == 2
    assert (
        "10-limits.yaml:11: test 'the third is deferred': repeat: expected a whole number from 1 to 1000, got 0"
        in out.getvalue()
    )
