"""Pipeline checks for DKIM, ARC and DMARC, the Authentication-Results header, and their factory.

Facts first: DkimCheck and ArcCheck only record results. DmarcCheck decides
(p=reject -> 550 5.7.1, p=quarantine -> QUARANTINE with a marker header, DNS
trouble -> 451 4.4.3) and carries our Authentication-Results header in every
verdict it returns, because a terminal verdict (QUARANTINE) ends the stage and
no later check would get to add it. With DMARC disabled, AuthResultsCheck adds
the header instead.

Forged A-R fields (those claiming our authserv-id) are removed at delivery by
the policy core, with the App's one :func:`smtpproxy.auth.authresults.forged_filter`
(for every message, whether these checks run or not). Results are kept in
``txn.state`` and read back with :mod:`smtpproxy.auth.results`.
"""

from __future__ import annotations

from typing import Any

from publicsuffixlist import PublicSuffixList

from smtpproxy.auth.arc import ArcResult, ArcVerifier
from smtpproxy.auth.authresults import FIELD, build_authentication_results
from smtpproxy.auth.dkim import DkimResults, DkimSignatureResult, DkimVerifier
from smtpproxy.auth.dmarc import DmarcEvaluator, DmarcResult
from smtpproxy.auth.results import arc_result, dkim_results, dmarc_result, spf_result
from smtpproxy.auth.spf import build_spf_check
from smtpproxy.config import Config, DmarcConfig
from smtpproxy.dns import Resolver
from smtpproxy.headers import header_values
from smtpproxy.metrics import Metrics
from smtpproxy.session import CheckResult, Session, Transaction
from smtpproxy.stages import Check, CheckOutcome
from smtpproxy.verdict import Action, HeaderEdit, HeaderEditKind, Reply, Verdict


class DkimCheck(Check):
    """Verifies DKIM signatures at end of DATA; records one CheckResult per signature."""

    name = "dkim"

    def __init__(self, verifier: DkimVerifier, metrics: Metrics) -> None:
        self.verifier = verifier
        self.metrics = metrics

    async def data(self, session: Session, txn: Transaction) -> CheckOutcome:
        """Keep ``DkimResults`` in ``txn.state`` and one ``txn.results["dkim"]`` per signature."""
        results = await self.verifier.verify(txn.message)
        txn.state.put(DkimResults(tuple(results)))
        if not results:
            txn.add_result(CheckResult("dkim", "none", {}, "message not signed"), many=True)
            self.metrics.auth_results.labels(method="dkim", result="none").inc()
        for sig in results:
            details = {
                "domain": sig.domain,
                "selector": sig.selector,
                "algorithm": sig.algorithm,
                "b": sig.b_prefix,
                "identity": sig.identity,
            }
            txn.add_result(CheckResult("dkim", sig.result, details, sig.reason), many=True)
            self.metrics.auth_results.labels(method="dkim", result=sig.result).inc()
        return None


class ArcCheck(Check):
    """Validates the ARC chain at end of DATA; keeps the ``ArcResult`` in ``txn.state`` and ``txn.results["arc"]``."""

    name = "arc"

    def __init__(self, verifier: ArcVerifier, metrics: Metrics) -> None:
        self.verifier = verifier
        self.metrics = metrics

    async def data(self, session: Session, txn: Transaction) -> CheckOutcome:
        """Validate and record; never decides."""
        result = await self.verifier.verify(txn.message)
        txn.state.put(result)
        self.metrics.auth_results.labels(method="arc", result=result.result).inc()
        details = {
            "instances": result.instances,
            "domains": list(result.domains),
            "oldest_pass": result.oldest_pass,
        }
        return CheckResult("arc", result.result, details, result.reason)


def authentication_results(authserv_id: str, session: Session, txn: Transaction) -> HeaderEdit:
    """Our A-R field from what the checks kept in ``txn.state`` (methods that did not run are left out)."""
    value = build_authentication_results(
        authserv_id,
        spf_result(txn),
        dkim_results(txn) if txn.state.peek(DkimResults) is not None else None,
        dmarc_result(txn),
        arc_result(txn),
        remote_ip=session.client_address,
    )
    return HeaderEdit(HeaderEditKind.ADD, FIELD, value)


class AuthResultsCheck(Check):
    """Adds the Authentication-Results header when no DmarcCheck does it."""

    name = "authres"
    after = ("spf", "dkim", "arc")

    def __init__(self, authserv_id: str) -> None:
        self.authserv_id = authserv_id

    async def data(self, session: Session, txn: Transaction) -> CheckOutcome:
        """A non-terminal verdict carrying the header edit."""
        return Verdict(header_edits=(authentication_results(self.authserv_id, session, txn),))


class DmarcCheck(Check):
    """Evaluates DMARC after SPF, DKIM and ARC, and enforces the domain's policy as configured.

    ``enforce`` applies reject/quarantine; ``temperror_action`` decides DNS failures
    (only while enforcing); ``report_only`` records and adds headers, nothing more.
    A failure is not enforced when the ARC chain passes and its newest seal is by
    a domain in ``trusted_arc_sealers`` (RFC 7489 §10.1 local policy override).
    Metric ``dmarc_policy{policy, enforced}`` counts every failing message by its
    disposition; enforced="true" only when we rejected or quarantined.
    """

    name = "dmarc"
    after = ("spf", "dkim", "arc")

    def __init__(
        self, config: DmarcConfig, evaluator: DmarcEvaluator, authserv_id: str, metrics: Metrics
    ) -> None:
        self.config = config
        self.evaluator = evaluator
        self.authserv_id = authserv_id
        self.metrics = metrics
        self.trusted_sealers = frozenset(config.trusted_arc_sealers)

    async def data(self, session: Session, txn: Transaction) -> CheckOutcome:
        """Evaluate, keep the ``DmarcResult`` in ``txn.state`` and ``txn.results["dmarc"]``, return the verdict."""
        from_values = header_values(txn.message, "From")
        dkim: list[DkimSignatureResult] = dkim_results(txn)
        res = await self.evaluator.evaluate(from_values, spf_result(txn), dkim)
        txn.state.put(res)
        override = self._arc_override(res, arc_result(txn))
        details: dict[str, Any] = {
            "from_domain": res.from_domain,
            "org_domain": res.org_domain,
            "policy": res.policy,
            "disposition": res.disposition,
            "spf_aligned": res.spf_aligned,
            "dkim_aligned": res.dkim_aligned,
            "override": override,
        }
        txn.add_result(CheckResult("dmarc", res.result, details, res.reason))
        self.metrics.auth_results.labels(method="dmarc", result=res.result).inc()
        edits = (authentication_results(self.authserv_id, session, txn),)
        return self._decide(res, override, edits)

    def _arc_override(self, res: DmarcResult, arc: ArcResult | None) -> str:
        if res.result != "fail" or arc is None or arc.result != "pass" or not arc.domains:
            return ""
        return "trusted_arc_sealer" if arc.domains[-1] in self.trusted_sealers else ""

    def _decide(self, res: DmarcResult, override: str, edits: tuple[HeaderEdit, ...]) -> Verdict:
        acting = self.config.enforce and not self.config.report_only
        failing = res.disposition in ("reject", "quarantine") or res.result == "fail"
        enforced = acting and not override and res.disposition in ("reject", "quarantine")
        if failing:
            self.metrics.dmarc_policy.labels(policy=res.disposition, enforced=str(enforced).lower()).inc()
        if enforced and res.disposition == "reject":
            text = f"Email rejected per DMARC policy for {res.from_domain}"
            return Verdict(Action.REJECT, Reply(550, "5.7.1", text), edits, reasons=("dmarc",))
        if enforced and res.disposition == "quarantine":
            marker = HeaderEdit(
                HeaderEditKind.ADD,
                self.config.quarantine_header,
                f"DMARC policy quarantine for {res.from_domain}",
            )
            return Verdict(Action.QUARANTINE, None, (*edits, marker), reasons=("dmarc",))
        if res.result == "temperror" and acting and self.config.temperror_action == "tempfail":
            text = f"Temporary DNS failure evaluating DMARC for {res.from_domain}, try again later"
            return Verdict(Action.TEMPFAIL, Reply(451, "4.4.3", text), edits, reasons=("dmarc",))
        return Verdict(header_edits=edits)


def build_auth_checks(
    config: Config, resolver: Resolver, metrics: Metrics, *, psl: PublicSuffixList | None = None
) -> list[Check]:
    """SPF, DKIM, ARC and DMARC checks as enabled by the config, in pipeline order.

    Builds the Public Suffix List once (about 40 ms); pass ``psl`` to share one.
    The A-R header comes from DmarcCheck, or from AuthResultsCheck when DMARC is off.
    """
    checks: list[Check] = []
    spf = build_spf_check(config.spf, resolver, metrics)
    if spf is not None:
        checks.append(spf)
    if config.dkim.enabled:
        verifier = DkimVerifier(resolver, config.dkim.max_signatures, config.dkim.min_key_bits)
        checks.append(DkimCheck(verifier, metrics))
    if config.arc.enabled:
        checks.append(ArcCheck(ArcVerifier(resolver, config.dkim.min_key_bits), metrics))
    if config.dmarc.enabled:
        evaluator = DmarcEvaluator(resolver, psl if psl is not None else PublicSuffixList())
        checks.append(DmarcCheck(config.dmarc, evaluator, config.hostname, metrics))
    else:
        checks.append(AuthResultsCheck(config.hostname))
    return checks
