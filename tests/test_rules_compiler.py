"""The rule compiler: every operator and field, composition, lists, and the error messages."""

from __future__ import annotations

import ipaddress
import textwrap
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.rules import RulesError, load_ruleset
from smtpproxy.rules.fields import EvalContext
from smtpproxy.rules.sessionstate import SessionRules
from smtpproxy.session import Recipient, Session, TlsInfo, Transaction
from smtpproxy.stages import Stage

MESSAGE = (
    b"Received: from a.example by b.example\r\n"
    b"Received: from c.example by d.example\r\n"
    b"From: =?utf-8?q?J=C3=B6rg_M=C3=BCller?= <joerg@News.Example.com>\r\n"
    b"Subject: =?iso-8859-1?q?Gr=FC=DFe?= aus =?utf-8?b?S8O2bG4=?=\r\n"
    b"X-Mailer: BulkMailer 3.1\r\n"
    b"List-Unsubscribe: <https://news.example.com/u>\r\n"
    b"\r\n"
    b"Hello, visit https://shop.example.net/deal?x=1. Thanks\r\n"
)


def session(ip: str = "192.0.2.10", helo: str | None = "mx.example.net", tls: str | None = None) -> Session:
    s = Session("S1", ipaddress.ip_address(ip), 4000, "127.0.0.1", 25, helo=helo)
    if tls:
        s.tls = TlsInfo(tls, "TLS_AES_256_GCM_SHA384", 256)
    return s


def txn(
    mail_from: str = "alice@sender.example", message: bytes = MESSAGE, rcpts: tuple[str, ...] = ()
) -> Transaction:
    t = Transaction("T1", mail_from, message=message)
    t.recipients.extend(Recipient(r) for r in rcpts)
    return t


def load(tmp_path: Path, text: str, name: str = "10-test.yaml") -> Any:
    (tmp_path / name).write_text(textwrap.dedent(text))
    return load_ruleset(tmp_path)


def evaluate(
    tmp_path: Path,
    condition: str,
    *,
    stage: str = "data",
    sess: Session | None = None,
    tx: Transaction | None = None,
    rcpt: Recipient | None = None,
    lists: str = "",
) -> Any:
    """Compile one rule with ``condition`` and return its evidence (None: no match)."""
    body = f"{lists}rules:\n  - name: t\n    stage: {stage}\n    if: {condition}\n    then: {{score: 1}}\n"
    ruleset = load(tmp_path, body)
    rule = ruleset.rules[0]
    s = sess or session()
    t = tx if tx is not None else (txn() if stage not in ("connect", "helo") else None)
    return rule.condition(EvalContext(s, t, Stage(stage), rcpt))


def problems_of(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(RulesError) as info:
        load(tmp_path, text)
    return [p.render() for p in info.value.problems]


# -- operators -----------------------------------------------------------------


def test_equals_is_case_insensitive_by_default(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{mail_from.domain: SENDER.Example}", stage="mail") == (
        ("mail_from.domain", "sender.example"),
    )
    assert evaluate(tmp_path, "{mail_from.domain: other.example}", stage="mail") is None


def test_case_sensitive_option_compares_exactly(tmp_path: Path) -> None:
    cond = "{header.x-mailer: {contains: bulkmailer, case_sensitive: true}}"
    assert evaluate(tmp_path, cond) is None
    assert evaluate(tmp_path, "{header.x-mailer: {contains: BulkMailer, case_sensitive: true}}") is not None


def test_contains_starts_with_ends_with_take_lists(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{header.x-mailer: {contains: [nope, mailer]}}") is not None
    assert evaluate(tmp_path, "{header.x-mailer: {starts_with: bulk}}") is not None
    assert evaluate(tmp_path, "{header.x-mailer: {ends_with: ['3.1', '9']}}") is not None
    assert evaluate(tmp_path, "{header.x-mailer: {ends_with: '3.2'}}") is None


def test_regex_is_case_insensitive_unless_asked(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{body: {regex: 'VISIT\\s+https'}}") == (("body", "visit https"),)
    assert evaluate(tmp_path, "{body: {regex: 'VISIT', case_sensitive: true}}") is None


def test_regex_evidence_is_the_matched_text_not_the_whole_body(tmp_path: Path) -> None:
    evidence = evaluate(tmp_path, "{body: {regex: 'sh[o0]p\\.example'}}")
    assert evidence == (("body", "shop.example"),)


def test_many_regex_rules_share_one_set_and_match_independently(tmp_path: Path) -> None:
    rules = "".join(
        f"  - name: r{i}\n    if: {{body: {{regex: 'token{i}x'}}}}\n    then: {{score: 1}}\n"
        for i in range(200)
    )
    ruleset = load(tmp_path, "rules:\n" + rules)
    t = txn(message=b"Subject: x\r\n\r\nsome token17x and TOKEN199X here\r\n")
    ctx = EvalContext(session(), t, Stage.DATA)
    matched = [r.name for r in ruleset.rules if r.condition(ctx) is not None]
    assert matched == ["r17", "r199"]


def test_in_list_inline_and_subdomains(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{from.domain: {in_list: [example.com]}}") is None
    assert evaluate(tmp_path, "{from.domain: {in_list: [example.com], subdomains: true}}") == (
        ("from.domain", "news.example.com (list (inline): example.com)"),
    )


def test_named_list_from_lists_folder_with_regex_entries(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "bulk.txt").write_text("# bulk mailers\n/^bulk ?mailer/  # comment\nother\n")
    assert evaluate(tmp_path, "{header.x-mailer: {in_list: bulk}}") is not None


def test_list_declared_in_a_rule_file_with_subdomains(tmp_path: Path) -> None:
    (tmp_path / "domains.txt").write_text("example.com\n")
    lists = "lists:\n  newsletters: {file: domains.txt, subdomains: true}\n"
    assert evaluate(tmp_path, "{from.domain: {in_list: newsletters}}", lists=lists) is not None


def test_cidr_ipv4_and_ipv6(tmp_path: Path) -> None:
    v6 = session(ip="2001:db8:1::25")
    assert evaluate(tmp_path, "{client.ip: {cidr: '2001:db8::/32'}}", stage="connect", sess=v6) == (
        ("client.ip", "2001:db8:1::25 (in 2001:db8::/32)"),
    )
    assert evaluate(tmp_path, "{client.ip: {cidr: '2001:db9::/32'}}", stage="connect", sess=v6) is None
    assert evaluate(tmp_path, "{client.ip: {cidr: [10.0.0.0/8, 192.0.2.0/24]}}", stage="connect") is not None
    assert evaluate(tmp_path, "{client.ip: '192.0.2.10'}", stage="connect") is not None


def test_ip_in_list_file_with_v4_and_v6_networks(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "partners.txt").write_text("198.51.100.0/24\n2001:db8:aa::/48\n")
    cond = "{client.ip: {in_list: partners}}"
    assert evaluate(tmp_path, cond, stage="connect", sess=session(ip="2001:db8:aa::1")) is not None
    assert evaluate(tmp_path, cond, stage="connect", sess=session(ip="198.51.100.77")) is not None
    assert evaluate(tmp_path, cond, stage="connect", sess=session(ip="2001:db8:ab::1")) is None


def test_numeric_comparisons(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{size: {gt: 100, lt: 100000}}") is not None
    assert evaluate(tmp_path, "{size: {le: 10}}") is None
    t = txn(rcpts=("a@example.org", "b@example.org"))
    assert evaluate(tmp_path, "{rcpt.count: {ge: 3}}", stage="rcpt", tx=t, rcpt=Recipient("c@example.org"))
    assert evaluate(tmp_path, "{rcpt.count: 2}", stage="data", tx=t) is not None


def test_size_before_data_is_the_declared_size(tmp_path: Path) -> None:
    t = Transaction("T", "a@b.example", mail_params=("BODY=8BITMIME", "SIZE=5000000"))
    assert evaluate(tmp_path, "{size: {gt: 1000000}}", stage="mail", tx=t) == (("size", "5e+06"),)


def test_exists(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{header.message-id: {exists: false}}") == (("header.message-id", "absent"),)
    assert evaluate(tmp_path, "{header.list-unsubscribe: {exists: true}}") is not None


def test_tls_fields(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{tls: false}", stage="helo") is not None
    secure = session(tls="TLSv1.3")
    assert evaluate(tmp_path, "{tls: true}", stage="helo", sess=secure) is not None
    assert evaluate(tmp_path, "{tls.version: tlsv1.3}", stage="helo", sess=secure) is not None


def test_all_any_not_and_their_evidence(tmp_path: Path) -> None:
    cond = "{all: [{header.x-mailer: {contains: bulk}}, {any: [{spf: pass}, {not: {spf: fail}}]}]}"
    assert evaluate(tmp_path, cond) == (("header.x-mailer", "BulkMailer 3.1"), ("not spf", "no match"))
    assert evaluate(tmp_path, "{not: {header.x-mailer: {contains: bulk}}}") is None


def test_several_keys_in_one_mapping_mean_all(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{header.x-mailer: {contains: bulk}, subject: {contains: nope}}") is None


# -- fields ----------------------------------------------------------------------


def test_rfc2047_headers_are_decoded(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{subject: 'Grüße aus Köln'}") is not None
    assert evaluate(tmp_path, "{from.name: {contains: 'jörg müller'}}") is not None
    assert evaluate(tmp_path, "{from.address: joerg@news.example.com}") is not None


def test_every_occurrence_of_a_header_is_seen(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{header.received: {contains: c.example}}") is not None


def test_raw_utf8_header_is_read_as_text(tmp_path: Path) -> None:
    t = txn(message="Subject: Grüße\r\n\r\nx\r\n".encode())
    assert evaluate(tmp_path, "{subject: grüße}", tx=t) is not None


def test_urls_and_url_domains(tmp_path: Path) -> None:
    assert evaluate(tmp_path, "{url: 'https://shop.example.net/deal?x=1'}") is not None
    assert evaluate(tmp_path, "{url.domain: {in_list: [example.net], subdomains: true}}") is not None


def test_rcpt_at_rcpt_stage_is_the_current_recipient_only(tmp_path: Path) -> None:
    t = txn(rcpts=("first@example.org",))
    cond = "{rcpt: first@example.org}"
    assert evaluate(tmp_path, cond, stage="rcpt", tx=t, rcpt=Recipient("second@example.org")) is None
    assert evaluate(tmp_path, cond, stage="data", tx=t) is not None
    assert evaluate(
        tmp_path, "{rcpt.domain: example.org}", stage="rcpt", tx=t, rcpt=Recipient("x@example.org")
    )


def test_authentication_result_fields(tmp_path: Path) -> None:
    from smtpproxy.auth.arc import ArcResult
    from smtpproxy.auth.dkim import DkimResults, DkimSignatureResult
    from smtpproxy.auth.dmarc import DmarcResult

    t = txn()
    signatures = [
        DkimSignatureResult(r, d, "s", "rsa-sha256", "", "@" + d, "")
        for r, d in (("fail", "bad.example"), ("pass", "Good.Example"))
    ]
    t.state.put(DkimResults(tuple(signatures)))
    t.state.put(DmarcResult("fail", "reject", "reject", "example.org", "example.org", False, False, ""))
    t.state.put(ArcResult("pass", 1, ("lists.example",)))
    assert evaluate(tmp_path, "{dkim: pass}", tx=t) is not None
    assert evaluate(tmp_path, "{dkim.pass_domain: good.example}", tx=t) is not None
    assert evaluate(tmp_path, "{dkim.pass_domain: bad.example}", tx=t) is None
    assert evaluate(tmp_path, "{all: [{dmarc: fail}, {dmarc.policy: reject}]}", tx=t) is not None
    assert evaluate(tmp_path, "{arc.domain: lists.example}", tx=t) is not None


def test_spf_from_its_check_result(tmp_path: Path) -> None:
    from smtpproxy.session import CheckResult

    t = txn()
    t.add_result(CheckResult("spf", "softfail"))
    assert evaluate(tmp_path, "{spf: softfail}", stage="mail", tx=t) is not None


def test_score_so_far(tmp_path: Path) -> None:
    t = txn()
    t.score = 7.5
    assert evaluate(tmp_path, "{score: {ge: 7}}", tx=t) == (("score", "7.5"),)


def test_dnsbl_condition_reads_the_session_cache(tmp_path: Path) -> None:
    s = session()
    s.state.get(SessionRules).dnsbl = {"zen.example": ("127.0.0.4",)}
    assert evaluate(tmp_path, "{dnsbl: zen.example}", stage="connect", sess=s) is not None
    assert (
        evaluate(tmp_path, "{dnsbl: {zone: zen.example, returns: [127.0.0.2]}}", stage="connect", sess=s)
        is None
    )
    assert evaluate(tmp_path, "{dnsbl: other.example}", stage="connect", sess=s) is None


# -- loading and errors -------------------------------------------------------------


def test_empty_or_missing_folder_means_no_rules(tmp_path: Path) -> None:
    assert len(load_ruleset(tmp_path / "absent")) == 0
    assert len(load_ruleset(tmp_path)) == 0


def test_top_level_list_form_and_file_order(tmp_path: Path) -> None:
    (tmp_path / "20-b.yaml").write_text("- name: b\n  then: stop\n")
    (tmp_path / "10-a.yml").write_text("- name: a\n  then: stop\n")
    assert [r.name for r in load_ruleset(tmp_path).rules] == ["a", "b"]


def test_unknown_field_names_file_line_rule_and_suggests(tmp_path: Path) -> None:
    found = problems_of(tmp_path, "rules:\n  - name: r1\n    if: {subjekt: x}\n    then: reject\n")
    assert found[0].startswith("10-test.yaml:3: rule r1: unknown field 'subjekt' (did you mean 'subject'?)")


def test_unknown_operator_lists_the_valid_ones(tmp_path: Path) -> None:
    found = problems_of(tmp_path, "rules:\n  - name: r1\n    if: {subject: {regexp: x}}\n    then: reject\n")
    assert (
        "10-test.yaml:3: rule r1: subject: unknown operator 'regexp' for a text field (did you mean 'regex'?)"
        in (found[0])
    )


def test_numeric_operator_on_ip_field_is_refused(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path, "rules:\n  - name: r1\n    stage: connect\n    if: {client.ip: {gt: 3}}\n    then: stop\n"
    )
    assert "expected one of equals, cidr, in_list, exists" in found[0]


def test_invalid_regex_is_reported(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path, "rules:\n  - name: r1\n    if: {body: {regex: '(a)\\1'}}\n    then: reject\n"
    )
    assert found[0].startswith("10-test.yaml:3: rule r1: regex '(a)\\\\1' is invalid")


def test_field_not_known_at_the_rules_stage(tmp_path: Path) -> None:
    found = problems_of(
        tmp_path, "rules:\n  - name: early\n    stage: mail\n    if: {subject: x}\n    then: reject\n"
    )
    assert found == [
        "10-test.yaml:4: rule early: field 'subject' is not known yet at stage mail; "
        "expected stage: data or later for this rule"
    ]


def test_every_problem_of_every_file_is_reported_together(tmp_path: Path) -> None:
    (tmp_path / "20-other.yaml").write_text("- name: dup\n  then: stop\n- name: dup\n  then: {score: many}\n")
    found = problems_of(tmp_path, "- name: ok\n  stage: later\n  then: stop\n")
    assert any(p.startswith("10-test.yaml:2: rule ok: stage: expected one of connect") for p in found)
    assert any(
        p.startswith("20-other.yaml:3: rule dup: duplicate rule name, first defined in 20-other.yaml:1")
        for p in found
    )
    assert any("20-other.yaml:4: rule dup: score: expected a number" in p for p in found)


def test_invalid_yaml_names_the_line(tmp_path: Path) -> None:
    found = problems_of(tmp_path, "- name: a\n  then: stop\n- name: [unclosed\n")
    assert found[0].startswith("10-test.yaml:4: invalid YAML") or found[0].startswith(
        "10-test.yaml:3: invalid YAML"
    )


def test_duplicate_yaml_keys_are_refused(tmp_path: Path) -> None:
    found = problems_of(tmp_path, "- name: a\n  then: stop\n  then: reject\n")
    assert found == ["10-test.yaml:3: duplicate key 'then' (first on line 2)"]


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        ("{reject: {code: 450}}", "reject: code 450 is invalid; expected a 5xx reply code like 550"),
        ("{tempfail: {code: 550}}", "tempfail: code 550 is invalid; expected a 4xx reply code like 450"),
        ("{reject: {code: 550, enhanced: '4.7.1'}}", "does not match the class of reply 550"),
        ("{add_header: {name: 'X Bad', value: v}}", "header name 'X Bad' is invalid"),
        ('{add_header: {name: X-A, value: "a\\nb"}}', "contains control characters"),
        ("{quarantine: {to: 'ftp://x'}}", "expected maildir:PATH or smtp://host:port"),
        ("[reject, tempfail]", "a rule has one final action"),
        ("rejekt", "unknown action 'rejekt'"),
    ],
)
def test_bad_actions_are_explained(tmp_path: Path, action: str, expected: str) -> None:
    found = problems_of(tmp_path, f"- name: r1\n  then: {action}\n")
    assert found and found[0].startswith("10-test.yaml:2: rule r1:"), found
    assert expected in found[0]


def test_discard_needs_a_message_stage(tmp_path: Path) -> None:
    found = problems_of(tmp_path, "- name: r1\n  stage: connect\n  then: discard\n")
    assert "discard needs a message; expected stage mail, rcpt or data, not connect" in found[0]


def test_unknown_list_is_reported(tmp_path: Path) -> None:
    found = problems_of(tmp_path, "- name: r1\n  if: {from.domain: {in_list: nope}}\n  then: reject\n")
    assert "in_list: unknown list 'nope'" in found[0]


def test_bad_list_entries_are_reported_with_their_line(tmp_path: Path) -> None:
    (tmp_path / "lists").mkdir()
    (tmp_path / "lists" / "bad.txt").write_text("ok.example\n/(unclosed/\n")
    found = problems_of(tmp_path, "- name: r1\n  then: stop\n")
    assert found[0].startswith("lists/bad.txt:2: list bad: invalid regex '/(unclosed/'")


def test_reject_defaults_and_custom_reply(tmp_path: Path) -> None:
    ruleset = load(
        tmp_path,
        "- name: a\n  then: reject\n- name: b\n  then: {tempfail: 'busy'}\n- name: c\n  then: {reject: {code: 554}}\n",
    )
    replies = [str(r.actions.reply) for r in ruleset.rules]
    assert replies == [
        "550 5.7.1 Message rejected by policy",
        "451 4.7.1 busy",
        "554 5.7.1 Message rejected by policy",
    ]


def test_disabled_rules_are_not_loaded(tmp_path: Path) -> None:
    assert len(load(tmp_path, "- name: a\n  enabled: false\n  then: reject\n")) == 0
