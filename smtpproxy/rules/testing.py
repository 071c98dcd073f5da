"""Inline rule tests: the ``tests:`` of rule files, run through the policy core on built sessions.

A test gives a message (inline text, or ``{file: x.eml}`` relative to the rule
file), envelope facts, the authentication results to assume, and what to
expect::

    tests:
      - name: exe attachment is refused
        message: {file: samples/invoice-exe.eml}
        client_ip: 192.0.2.7          # defaults: 192.0.2.1, mail.example.net,
        helo: mx.example.net          #   sender@example.net, [user@example.org]
        mail_from: billing@example.net
        rcpts: [user@example.org]
        spf: pass
        dkim: [{domain: example.net, result: pass}]
        dmarc: {result: pass, policy: none}
        dnsbl: {zen.example: [127.0.0.2]}   # listings to assume instead of DNS
        expect: {action: reject, code: 554, rules: [reject_executables]}

Every test runs against the whole rule set (all files), as in production.
``repeat: N`` runs the message N times (a new connection each time) and checks
the last run: each test has its own in-memory rate limiter with the clock
stopped, so ``ratelimit`` actions count exactly (``burst: 2`` refuses run 3).
"""

from __future__ import annotations

import asyncio
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from smtpproxy.auth.arc import ArcResult
from smtpproxy.auth.authresults import forged_filter
from smtpproxy.auth.dkim import DkimResults, DkimSignatureResult
from smtpproxy.auth.dmarc import DmarcResult
from smtpproxy.auth.spf import SpfResult
from smtpproxy.config import ScoresConfig, SessionLimitsConfig
from smtpproxy.logs import EventLog
from smtpproxy.metrics import Metrics
from smtpproxy.pipeline import Pipeline
from smtpproxy.policy.core import Policy
from smtpproxy.policy.offline import drive
from smtpproxy.ratelimit.memory import MemoryStore
from smtpproxy.ratelimit.session_limits import SessionLimits
from smtpproxy.rules.check import DnsResolver
from smtpproxy.rules.engine import RulesEngine, memory_limiter
from smtpproxy.rules.loader import LList, LMap, Problem, describe, line_of
from smtpproxy.rules.ruleset import RuleSet, TestBlock, load_ruleset
from smtpproxy.rules.sessionstate import SessionRules
from smtpproxy.session import CheckResult, Session, TlsInfo, Transaction, new_id
from smtpproxy.stages import Check, CheckOutcome
from smtpproxy.verdict import Action, HeaderEdit

TEST_KEYS = ("name", "message", "client_ip", "client_rdns", "helo", "tls", "mail_from", "rcpts")
AUTH_KEYS = ("spf", "dkim", "dmarc", "arc", "dnsbl")
EXPECT_KEYS = ("action", "code", "enhanced", "rules", "rules_exact", "not_rules", "headers")
ACTION_WORDS = {a.word: a for a in Action} | {"deliver": Action.CONTINUE}
MAX_REPEAT = 1000
TEST_LIMITER_KEYS = 1024  # slots of each test's own memory store
TEST_HOSTNAME = "mx.test.invalid"


@dataclass(frozen=True, slots=True)
class AssumedResult:
    """An authentication result a test assumes (what the auth checks would have found)."""

    result: str
    domain: str = ""
    policy: str = ""
    disposition: str = ""
    domains: tuple[str, ...] = ()


@dataclass(slots=True)
class TestCase:
    """One compiled inline test."""

    file: str
    line: int
    name: str
    message: bytes
    facts: dict[str, Any]
    expect: dict[str, Any]
    repeat: int = 1


@dataclass(slots=True)
class Outcome:
    """What the rules did to a test message."""

    action: Action = Action.CONTINUE
    code: int | None = None
    enhanced: str = ""
    stage: str = ""
    rules: list[str] = field(default_factory=list)
    edits: tuple[HeaderEdit, ...] = ()
    score: float = 0.0


@dataclass(slots=True)
class TestResult:
    """The verdict on one test."""

    file: str
    line: int
    name: str
    failures: list[str]
    outcome: Outcome | None

    @property
    def passed(self) -> bool:
        """True when every expectation held."""
        return not self.failures


@dataclass(slots=True)
class TestReport:
    """Every test of a rules folder."""

    results: list[TestResult]

    @property
    def passed(self) -> bool:
        """True when all tests passed (and there were no invalid tests)."""
        return all(r.passed for r in self.results)

    def render(self) -> str:
        """The pass/fail report printed by ``smtpproxy rules test``."""
        lines = []
        for r in self.results:
            mark = "PASS" if r.passed else "FAIL"
            got = ""
            if r.outcome is not None:
                o = r.outcome
                code = f" {o.code}" if o.code else ""
                got = f" -> {o.action.word}{code} at {o.stage or '-'}, score {o.score:g}, rules {o.rules or '[]'}"
            lines.append(f"{mark} {r.file}:{r.line}: {r.name}{got}")
            lines.extend(f"     {failure}" for failure in r.failures)
        failed = sum(not r.passed for r in self.results)
        lines.append(f"{len(self.results) - failed} passed, {failed} failed")
        return "\n".join(lines)


def _problem(file: str, line: int, name: str, message: str) -> Problem:
    return Problem(file, line, name, message, kind="test")


def _message(block: TestBlock, node: Any, line: int, problems: list[Problem], name: str) -> bytes:
    if isinstance(node, str):
        return node.replace("\r\n", "\n").replace("\n", "\r\n").encode("utf-8")
    if isinstance(node, dict) and set(node) == {"file"}:
        path = block.path.parent / str(node["file"])
        try:
            return path.read_bytes()
        except OSError as err:
            problems.append(_problem(block.file, line, name, f"test message {node['file']}: {err.strerror}"))
            return b""
    problems.append(
        _problem(block.file, line, name, f"message: expected text or {{file: x.eml}}, got {describe(node)}")
    )
    return b""


def compile_tests(block: TestBlock) -> tuple[list[TestCase], list[Problem]]:
    """Validate the ``tests:`` of one file."""
    problems: list[Problem] = []
    node = block.node
    if not isinstance(node, list):
        return [], [
            _problem(block.file, line_of(node), "", f"tests: expected a list of tests, got {describe(node)}")
        ]
    cases = []
    lines = node.item_lines if isinstance(node, LList) else [0] * len(node)
    for item, line in zip(node, lines, strict=True):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            problems.append(
                _problem(block.file, line, "", "test: expected a mapping with a name, message and expect")
            )
            continue
        name = repr(item["name"])
        where = item.line_of if isinstance(item, LMap) else (lambda _k, ln=line: ln)
        for key in item:
            if key not in (*TEST_KEYS, *AUTH_KEYS, "repeat", "expect"):
                allowed = ", ".join((*TEST_KEYS, *AUTH_KEYS, "repeat", "expect"))
                problems.append(
                    _problem(block.file, where(key), name, f"unknown key {key!r}; expected one of {allowed}")
                )
        expect = item.get("expect")
        if not isinstance(expect, dict) or not expect or set(expect) - set(EXPECT_KEYS):
            problems.append(
                _problem(
                    block.file,
                    where("expect"),
                    name,
                    f"expect: expected a mapping of {', '.join(EXPECT_KEYS)}, got {describe(expect)}",
                )
            )
            continue
        if "action" in expect and str(expect["action"]) not in ACTION_WORDS:
            problems.append(
                _problem(
                    block.file,
                    where("expect"),
                    name,
                    f"expect.action: expected one of {', '.join(ACTION_WORDS)}, got {describe(expect['action'])}",
                )
            )
        try:
            ipaddress.ip_address(str(item.get("client_ip", "192.0.2.1")))
        except ValueError:
            problems.append(
                _problem(block.file, where("client_ip"), name, "client_ip: expected an IP address")
            )
        repeat = item.get("repeat", 1)
        if isinstance(repeat, bool) or not isinstance(repeat, int) or not 1 <= repeat <= MAX_REPEAT:
            problems.append(
                _problem(
                    block.file,
                    where("repeat"),
                    name,
                    f"repeat: expected a whole number from 1 to {MAX_REPEAT}, got {describe(repeat)}",
                )
            )
            continue
        message = _message(block, item.get("message", ""), where("message"), problems, name)
        facts = {k: item[k] for k in (*TEST_KEYS, *AUTH_KEYS) if k in item and k not in ("name", "message")}
        cases.append(TestCase(block.file, line, str(item["name"]), message, facts, dict(expect), repeat))
    return cases, problems


def _auth(value: Any) -> list[AssumedResult]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, dict):
            domains = item.get("domains", ())
            out.append(
                AssumedResult(
                    str(item.get("result", "")),
                    str(item.get("domain", "")),
                    str(item.get("policy", "")),
                    str(item.get("disposition", "")),
                    tuple(str(d) for d in ([domains] if isinstance(domains, str) else domains)),
                )
            )
        else:
            out.append(AssumedResult(str(item)))
    return out


def _session(facts: dict[str, Any]) -> Session:
    session = Session(
        new_id(), ipaddress.ip_address(str(facts.get("client_ip", "192.0.2.1"))), 25, "127.0.0.1", 25
    )
    session.rdns = facts.get("client_rdns")
    tls = facts.get("tls")
    if tls:
        session.tls = TlsInfo(tls if isinstance(tls, str) else "TLSv1.3", "TEST", 256)
    dnsbl = facts.get("dnsbl") or {}
    session.state.get(SessionRules).dnsbl = {
        str(z).lower(): tuple(str(r) for r in (v if isinstance(v, list) else [v])) for z, v in dnsbl.items()
    }
    return session


class AssumedResults(Check):
    """The authentication results a test assumes, recorded at MAIL as the auth checks would."""

    name = "assumed"
    pure = True
    timed = False

    def __init__(self, facts: dict[str, Any]) -> None:
        self.facts = facts

    async def mail(self, session: Session, txn: Transaction) -> CheckOutcome:
        for method in ("spf", "dkim", "dmarc", "arc"):
            if method in self.facts:
                results = _auth(self.facts[method])
                txn.state.put(_as_result(method, results))
                txn.results[method] = CheckResult(method, results[0].result if results else "none")
        return None


def _as_result(method: str, assumed: list[AssumedResult]) -> object:
    """The result the check of ``method`` would have kept, built from what the test assumes."""
    first = assumed[0] if assumed else AssumedResult("none")
    if method == "spf":
        return SpfResult(first.result, first.domain, "mailfrom", "", "")
    if method == "dkim":
        return DkimResults(
            tuple(DkimSignatureResult(a.result, a.domain, "", "", "", "", "") for a in assumed)
        )
    if method == "dmarc":
        return DmarcResult(
            first.result, first.policy, first.disposition or "none", first.domain, "", False, False, ""
        )
    return ArcResult(first.result, len(first.domains), first.domains)


def case_policy(engine: RulesEngine, facts: dict[str, Any]) -> Policy:
    """The policy core with the rules and the assumed results as its only checks."""
    metrics = engine.metrics
    pipeline = Pipeline([AssumedResults(facts), engine.check], metrics)
    limits = SessionLimits(SessionLimitsConfig(), metrics)
    return Policy(pipeline, limits, metrics, EventLog(), TEST_HOSTNAME, forged_filter(TEST_HOSTNAME))


async def run_case(engine: RulesEngine, case: TestCase, policy: Policy | None = None) -> Outcome:
    """Drive one test message through the policy core, as a client would through the proxy."""
    facts = case.facts
    policy = policy or case_policy(engine, facts)
    result = await drive(
        policy.session(_session(facts)),
        case.message,
        helo=str(facts.get("helo", "mail.example.net")),
        mail_from=str(facts.get("mail_from", "sender@example.net")),
        rcpts=[str(a) for a in facts.get("rcpts", ["user@example.org"])],
    )
    refused = result.action in (Action.REJECT, Action.TEMPFAIL)
    return Outcome(
        action=result.action,
        code=result.reply.code if refused else None,
        enhanced=result.reply.enhanced if refused else "",
        stage=result.stage,
        rules=result.rules,
        edits=result.header_edits,
        score=result.score,
    )


def check_expectations(case: TestCase, outcome: Outcome) -> list[str]:
    """The expectations of ``case`` that ``outcome`` does not meet."""
    expect, failures = case.expect, []
    if "action" in expect and ACTION_WORDS[str(expect["action"])] is not outcome.action:
        failures.append(f"expected action {expect['action']}, got {outcome.action.word}")
    if "code" in expect and expect["code"] != outcome.code:
        failures.append(f"expected reply code {expect['code']}, got {outcome.code}")
    if "enhanced" in expect and str(expect["enhanced"]) != outcome.enhanced:
        failures.append(f"expected enhanced code {expect['enhanced']}, got {outcome.enhanced or 'none'}")
    wanted = [str(r) for r in expect.get("rules", [])]
    missing = [r for r in wanted if r not in outcome.rules]
    if missing:
        failures.append(f"expected rules {missing} to match; matched {outcome.rules}")
    if "rules_exact" in expect and sorted(map(str, expect["rules_exact"])) != sorted(outcome.rules):
        failures.append(f"expected exactly rules {list(expect['rules_exact'])}; matched {outcome.rules}")
    unwanted = [r for r in map(str, expect.get("not_rules", [])) if r in outcome.rules]
    if unwanted:
        failures.append(f"expected rules {unwanted} not to match")
    for name, value in (expect.get("headers") or {}).items():
        added = [e.value for e in outcome.edits if e.name.lower() == str(name).lower()]
        if str(value) not in added:
            failures.append(f"expected header {name}: {value}; added {added or 'none'}")
    return failures


async def run_rule_tests_async(
    path: Path, resolver: DnsResolver | None = None, scores: ScoresConfig | None = None
) -> TestReport:
    """Load the rules folder (RulesError when it is bad) and run every inline test."""
    ruleset: RuleSet = load_ruleset(path)
    engine = RulesEngine(path, Metrics(process=False), resolver=resolver, scores=scores)
    engine.current = ruleset
    results = []
    for block in ruleset.tests:
        cases, problems = compile_tests(block)
        results += [
            TestResult(p.file, p.line, p.rule or "test", [f"invalid test: {p.message}"], None)
            for p in problems
        ]
        for case in cases:
            # Each test counts alone, and time stands still: repeat N is exact.
            engine.limiter = memory_limiter(engine.metrics, MemoryStore(TEST_LIMITER_KEYS, clock=lambda: 0.0))
            policy = case_policy(engine, case.facts)
            for _ in range(case.repeat):
                outcome = await run_case(engine, case, policy)
            results.append(
                TestResult(case.file, case.line, case.name, check_expectations(case, outcome), outcome)
            )
    return TestReport(results)


def run_rule_tests(
    path: Path, resolver: DnsResolver | None = None, scores: ScoresConfig | None = None
) -> TestReport:
    """Synchronous :func:`run_rule_tests_async` for the CLI (starts its own event loop)."""
    return asyncio.run(run_rule_tests_async(path, resolver, scores))
