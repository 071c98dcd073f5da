"""RulesCheck: evaluates the rules of each stage and turns what matched into a Verdict.

State kept between stages (all in ``extras``, nothing on the check itself):

- ``session.extras``: per connection stage, what its rules scored, matched
  and edited (:mod:`smtpproxy.rules.sessionstate`; copied into every
  transaction at MAIL, a new HELO replacing the last one's), ``rules_dnsbl``
  (zone -> records).
- ``txn.extras``: ``rules_ruleset`` (the RuleSet captured at MAIL: a reload
  mid-transaction does not change its rules), ``rule_matches`` (why each rule
  matched), ``rules_edits`` (header edits decided before DATA), ``rules_pending``
  (a discard/quarantine decided at MAIL or RCPT, answered at DATA), ``rules_done``.

Scores are added to ``txn.score`` directly, as rules run, so that later rules
and the thresholds see the score so far; verdicts therefore carry score 0.

A ``ratelimit`` action needs the store (I/O) while ``evaluate`` is pure and
synchronous: evaluation pauses at a matching rate-limited rule (``pending``),
:meth:`RulesCheck.run_rules` awaits the limiter, then either ends the stage
with the rule's tempfail or resumes with the next rule. Limits are thus asked
in rule order, and only while no earlier rule has decided.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

from smtpproxy.quarantine import quarantine_headers
from smtpproxy.rules.actions import QUARANTINE_HEADER, RuleActions
from smtpproxy.rules.conditions import Evidence
from smtpproxy.rules.fields import EvalContext
from smtpproxy.rules.ruleset import Rule, RuleSet
from smtpproxy.rules.sessionstate import (
    session_edits,
    session_matches,
    session_score,
    session_stages,
    session_stopped,
    start_stage,
)
from smtpproxy.session import Recipient, Session, Transaction
from smtpproxy.stages import Check, CheckOutcome, Stage
from smtpproxy.verdict import Action, HeaderEdit, HeaderEditKind, Reply, Verdict

if TYPE_CHECKING:
    from smtpproxy.config import ScoresConfig
    from smtpproxy.metrics import Metrics
    from smtpproxy.ratelimit.limiter import RateLimiter

log = logging.getLogger("smtpproxy.rules")

SPAM_REJECT = Reply(550, "5.7.1", "Message rejected as spam")
SPAM_TEMPFAIL = Reply(451, "4.7.1", "Message looks like spam, try again later")


class DnsResolver(Protocol):
    """What rules need of :class:`smtpproxy.dns.Resolver`."""

    async def query(self, name: str, rdtype: str) -> Any: ...


@dataclass(slots=True)
class StageResult:
    """What one stage's rules did."""

    matched: list[dict[str, Any]] = field(default_factory=list)
    edits: list[HeaderEdit] = field(default_factory=list)
    terminal: Rule | None = None
    stopped: bool = False
    pending: tuple[int, str] | None = None  # (index, key) of a matched ratelimit rule to ask about


def match_record(rule: Rule, stage: Stage, evidence: Evidence) -> dict[str, Any]:
    """The ``rule_matches`` entry of one match: which rule, and which field and value made it match."""
    first = evidence[0] if evidence else ("", "")
    return {
        "rule": rule.name,
        "stage": stage.value,
        "file": f"{rule.file}:{rule.line}",
        "field": first[0],
        "value": first[1],
        "evidence": [{"field": f, "value": v} for f, v in evidence],
        "actions": list(rule.actions.words),
        "score": rule.actions.score,
    }


def dnsbl_name(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, zone: str) -> str:
    """The DNSBL query name: reversed octets (IPv4) or nibbles (IPv6), then the zone."""
    if isinstance(ip, ipaddress.IPv4Address):
        return ".".join(reversed(str(ip).split("."))) + "." + zone
    return ".".join(reversed(ip.exploded.replace(":", ""))) + "." + zone


class RuleSource(Protocol):
    """What RulesCheck needs of the engine that owns it (``RulesEngine``): no back-reference to its type."""

    current: RuleSet
    metrics: Metrics
    resolver: DnsResolver | None
    scores: ScoresConfig
    limiter: RateLimiter


class RulesCheck(Check):
    """The ``rules`` check: runs after authentication so rules can use its results."""

    name = "rules"
    after = ("spf", "dkim", "arc", "dmarc")

    def __init__(self, engine: RuleSource) -> None:
        self.engine = engine
        self._failed_fields: set[str] = set()  # logged once each; every failure is counted

    def field_failed(self, name: str, err: Exception) -> None:
        """A field reader raised: counted in smtpproxy_check_errors{check="rules",kind="field"}, logged once."""
        self.engine.metrics.check_errors.labels("rules", "field").inc()
        if name not in self._failed_fields:
            self._failed_fields.add(name)
            log.error("rules: field %s could not be read (rules using it do not match)", name, exc_info=err)

    def active(self, stage: Stage) -> bool:
        """MAIL (captures the rule set) and DATA (score thresholds) always; others when rules exist."""
        return stage in (Stage.MAIL, Stage.DATA) or bool(self.engine.current.by_stage.get(stage))

    # -- evaluation -----------------------------------------------------------

    def evaluate(
        self, rules: tuple[Rule, ...], ctx: EvalContext, result: StageResult | None = None, start: int = 0
    ) -> StageResult:
        """Run ``rules`` from ``start``: record matches, add scores, stop at the first terminal rule.

        Also stops after a matching rule with a ratelimit, setting ``pending``
        (see :meth:`run_rules`): its score and header edits apply either way.
        """
        result = result if result is not None else StageResult()
        hits = self.engine.metrics.rule_hits
        for index in range(start, len(rules)):
            rule = rules[index]
            evidence = rule.condition(ctx)
            if evidence is None:
                continue
            actions: RuleActions = rule.actions
            hits.labels(rule.name).inc()
            result.matched.append(match_record(rule, ctx.stage, evidence))
            if actions.score:
                if ctx.txn is not None:
                    ctx.txn.score += actions.score
                else:
                    session_stages(ctx.session)[ctx.stage].score += actions.score
            result.edits.extend(actions.edits)
            if actions.ratelimit is not None:
                result.pending = (index, actions.ratelimit.key(ctx))
                break
            if actions.terminal is not Action.CONTINUE:
                result.terminal = rule
                break
            if actions.stop:
                result.stopped = True
                break
        return result

    async def run_rules(self, rules: tuple[Rule, ...], ctx: EvalContext) -> StageResult:
        """``evaluate``, asking the limiter for each matching ratelimit rule in turn.

        Refused: that rule becomes the stage's terminal rule, a tempfail with
        the limit's reply. Allowed: its ``stop`` applies, else the next rules run.
        """
        result = self.evaluate(rules, ctx)
        while result.pending is not None:
            index, key = result.pending
            result.pending = None
            rule = rules[index]
            limit = rule.actions.ratelimit
            assert limit is not None
            if not await self.engine.limiter.hit(rule.name, key, limit.rate, limit.burst):
                refused = replace(rule.actions, terminal=Action.TEMPFAIL, reply=limit.reply)
                result.terminal = replace(rule, actions=refused)
                break
            if rule.actions.stop:
                result.stopped = True
                break
            self.evaluate(rules, ctx, result, index + 1)
        return result

    async def prefetch_dnsbl(self, session: Session, zones: tuple[str, ...]) -> None:
        """Look up the client on every DNSBL zone the stage's rules name, once per connection."""
        cache: dict[str, tuple[str, ...]] = session.extras.setdefault("rules_dnsbl", {})
        missing = [z for z in zones if z not in cache]
        if not missing:
            return
        resolver = self.engine.resolver
        if resolver is None:
            cache.update(dict.fromkeys(missing, ()))
            return

        async def one(zone: str) -> tuple[str, tuple[str, ...]]:
            try:
                answer = await resolver.query(dnsbl_name(session.client_ip, zone), "A")
            except Exception:  # the resolver should not raise; an unlisted client is the safe reading
                log.warning("DNSBL lookup on %s failed (session %s)", zone, session.id, exc_info=True)
                return zone, ()
            if getattr(answer, "status", "") != "ok":
                return zone, ()
            # Only 127.0.0.0/8 answers are listings; anything else is a misconfigured or hijacked zone.
            return zone, tuple(r for r in answer.records if str(r).startswith("127."))

        for zone, records in await asyncio.gather(*(one(z) for z in missing)):
            cache[zone] = records

    # -- per-transaction state --------------------------------------------------

    def _txn_state(self, session: Session, txn: Transaction) -> RuleSet:
        ruleset = txn.extras.get("rules_ruleset")
        if isinstance(ruleset, RuleSet):
            return ruleset
        ruleset = self.engine.current
        txn.extras["rules_ruleset"] = ruleset
        txn.score += session_score(session)
        earlier = session_matches(session)
        txn.extras["rule_matches"] = earlier
        txn.matched_rules.extend(m["rule"] for m in earlier)
        txn.extras["rules_edits"] = session_edits(session)
        if session_stopped(session):
            txn.extras["rules_done"] = True
        return ruleset

    def _record(self, txn: Transaction, result: StageResult) -> None:
        txn.extras["rule_matches"].extend(result.matched)
        txn.matched_rules.extend(m["rule"] for m in result.matched)

    # -- stages -----------------------------------------------------------------

    async def _session_stage(self, session: Session, stage: Stage) -> CheckOutcome:
        if session_stopped(session, before=stage):
            return None
        ruleset = self.engine.current
        rules = ruleset.by_stage[stage]
        if not rules:
            return None
        # Each greeting is judged afresh: a second EHLO replaces the first's score.
        entry = start_stage(session, stage)
        await self.prefetch_dnsbl(session, ruleset.dnsbl_zones[stage])
        result = await self.run_rules(rules, EvalContext(session, None, stage, on_error=self.field_failed))
        entry.matches.extend(result.matched)
        entry.edits.extend(result.edits)
        entry.stopped = result.stopped
        return self._immediate(result)

    def _immediate(self, result: StageResult) -> Verdict | None:
        """The verdict a stage answers now: accept, reject or tempfail (the rest waits for DATA)."""
        rule = result.terminal
        if rule is None or rule.actions.terminal in (Action.DISCARD, Action.QUARANTINE):
            return None
        return self._decided(rule)

    def _decided(self, rule: Rule) -> Verdict:
        """The verdict of a rule's accept, reject or tempfail."""
        reply = rule.actions.reply
        # 421 means "closing the channel" (RFC 5321 4.2.2): keep the promise.
        closing = reply is not None and reply.code == 421
        return Verdict(rule.actions.terminal, reply, reasons=(rule.name,), disconnect=closing)

    async def connect(self, session: Session) -> CheckOutcome:
        """Connection rules (client IP, rDNS, DNSBL)."""
        return await self._session_stage(session, Stage.CONNECT)

    async def helo(self, session: Session) -> CheckOutcome:
        """HELO rules."""
        return await self._session_stage(session, Stage.HELO)

    async def _txn_stage(
        self, session: Session, txn: Transaction, stage: Stage, rcpt: Recipient | None = None
    ) -> StageResult | None:
        ruleset = self._txn_state(session, txn)
        rules = ruleset.by_stage[stage]
        if txn.extras.get("rules_done") or not rules:
            return None
        await self.prefetch_dnsbl(session, ruleset.dnsbl_zones[stage])
        result = await self.run_rules(rules, EvalContext(session, txn, stage, rcpt, self.field_failed))
        self._record(txn, result)
        txn.extras["rules_edits"].extend(result.edits)
        rule = result.terminal
        if result.stopped or (
            rule is not None and rule.actions.terminal in (Action.ACCEPT, Action.DISCARD, Action.QUARANTINE)
        ):
            txn.extras["rules_done"] = True
        if rule is not None and rule.actions.terminal in (Action.DISCARD, Action.QUARANTINE):
            txn.extras["rules_pending"] = rule
        return result

    async def mail(self, session: Session, txn: Transaction) -> CheckOutcome:
        """MAIL FROM rules; captures the RuleSet this transaction will use."""
        result = await self._txn_stage(session, txn, Stage.MAIL)
        return self._immediate(result) if result else None

    async def rcpt(self, session: Session, txn: Transaction, rcpt: Recipient) -> CheckOutcome:
        """RCPT TO rules, once per recipient: a reject refuses this recipient only."""
        result = await self._txn_stage(session, txn, Stage.RCPT, rcpt)
        return self._immediate(result) if result else None

    async def data(self, session: Session, txn: Transaction) -> CheckOutcome:
        """End-of-DATA rules, then the score thresholds; all header edits are returned here."""
        result = await self._txn_stage(session, txn, Stage.DATA)
        edits: list[HeaderEdit] = list(txn.extras.get("rules_edits", []))
        rule = result.terminal if result else None
        pending = txn.extras.get("rules_pending")
        if rule is None and isinstance(pending, Rule):
            rule = pending
        if rule is not None and rule.actions.terminal in (Action.REJECT, Action.TEMPFAIL):
            return self._decided(rule)
        if rule is not None and rule.actions.terminal is Action.ACCEPT:
            return Verdict(Action.ACCEPT, header_edits=tuple(edits), reasons=(rule.name,))
        action, reply, reason = self._thresholds(txn.score, edits)
        quarantine_to = self.engine.scores.quarantine_to if action is Action.QUARANTINE else None
        if rule is not None and rule.actions.terminal >= action:
            action, reply, reason = rule.actions.terminal, None, rule.name
            quarantine_to = rule.actions.quarantine_to
        elif action is Action.QUARANTINE:
            edits.append(HeaderEdit(HeaderEditKind.ADD, QUARANTINE_HEADER, "score"))
        if action is Action.QUARANTINE and quarantine_to is not None:
            edits += quarantine_headers(txn)
        reasons = (reason,) if action.is_terminal else tuple(dict.fromkeys(txn.matched_rules))
        return Verdict(action, reply, tuple(edits), reasons, quarantine_to=quarantine_to)

    def _thresholds(self, score: float, edits: list[HeaderEdit]) -> tuple[Action, Reply | None, str]:
        """The action the score reaches; adds the X-Spam headers at the add_header threshold."""
        scores = self.engine.scores
        if scores.add_header is not None and score >= scores.add_header:
            edits.append(HeaderEdit(HeaderEditKind.ADD, "X-Spam-Flag", "YES"))
            edits.append(HeaderEdit(HeaderEditKind.ADD, "X-Spam-Score", f"{score:.1f}"))
        if scores.reject is not None and score >= scores.reject:
            return Action.REJECT, SPAM_REJECT, "score"
        if scores.tempfail is not None and score >= scores.tempfail:
            return Action.TEMPFAIL, SPAM_TEMPFAIL, "score"
        if scores.quarantine is not None and score >= scores.quarantine:
            return Action.QUARANTINE, None, "score"
        return Action.CONTINUE, None, ""
