"""DKIM/ARC/DMARC pipeline checks: verdicts, header edits, metrics; and end to end through a real proxy."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterator
from typing import Any

import pytest
from publicsuffixlist import PublicSuffixList

from smtpproxy.auth.authresults import forged_filter, parse_authentication_results
from smtpproxy.auth.checks import AuthResultsCheck, build_auth_checks
from smtpproxy.config import build_config
from smtpproxy.dns import Resolver
from smtpproxy.headers import apply_edits, remove_fields_where
from smtpproxy.metrics import Metrics
from smtpproxy.pipeline import Pipeline
from smtpproxy.session import Session, Transaction
from smtpproxy.stages import Check, Stage
from smtpproxy.verdict import Action, HeaderEditKind, StageOutcome
from tests.backends import RecordingBackend
from tests.dkimkeys import KeyPair, arc_seal, message, rsa_key, sign
from tests.dnsserver import DnsServer
from tests.smtpclient import RawClient

ID = "mx.test.example"
CLIENT = "192.0.2.10"


@pytest.fixture(scope="module")
def key() -> KeyPair:
    return rsa_key(2048)


@pytest.fixture(scope="module")
def psl() -> PublicSuffixList:
    return PublicSuffixList()


@pytest.fixture
def dns(key: KeyPair) -> Iterator[DnsServer]:
    zone: dict[str, list[tuple[str, object]] | str] = {
        "sel._domainkey.example.org": [("TXT", key.txt)],
        "arc._domainkey.lists.example": [("TXT", key.txt)],
        "example.org": [("TXT", "v=spf1 ip4:192.0.2.0/24 ip4:127.0.0.1 -all"), ("A", "192.0.2.1")],
        "_dmarc.example.org": [("TXT", "v=DMARC1; p=reject")],
        "evil.example": [("TXT", "v=spf1 ip4:192.0.2.0/24 -all")],
        "_dmarc.quarantine.example": [("TXT", "v=DMARC1; p=quarantine")],
        "_dmarc.slow.example": "TIMEOUT",
    }
    with DnsServer(zone) as srv:
        yield srv


class Harness:
    """The auth checks in a real Pipeline, fed one transaction at a time."""

    def __init__(self, resolver: Resolver, psl: PublicSuffixList, overrides: dict[str, Any]) -> None:
        self.config = build_config({"hostname": ID, **overrides})
        self.metrics = Metrics(process=False)
        self.checks = build_auth_checks(self.config, resolver, self.metrics, psl=psl)
        self.pipeline = Pipeline(self.checks, self.metrics)

    async def run(
        self, msg: bytes, mail_from: str = "bounce@example.org"
    ) -> tuple[StageOutcome, Transaction]:
        session = Session("S1", ipaddress.ip_address(CLIENT), 40000, "127.0.0.1", 25, helo="client.test")
        txn = Transaction("T1", mail_from)
        mail = await self.pipeline.run(Stage.MAIL, session, txn)
        assert mail.action is Action.CONTINUE
        txn.message = msg
        return await self.pipeline.run(Stage.DATA, session, txn), txn

    def sample(self, name: str, labels: dict[str, str]) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0


@pytest.fixture
def harness(resolver: Resolver, psl: PublicSuffixList) -> Any:
    def make(**overrides: Any) -> Harness:
        return Harness(resolver, psl, overrides)

    return make


def ar_of(outcome: StageOutcome) -> Any:
    values = [e.value for e in outcome.header_edits if e.name == "Authentication-Results"]
    assert len(values) == 1, outcome.header_edits
    return parse_authentication_results(values[0])


def test_factory_builds_checks_in_order_as_enabled(resolver: Resolver, psl: PublicSuffixList) -> None:
    metrics = Metrics(process=False)
    names = [c.name for c in build_auth_checks(build_config({}), resolver, metrics, psl=psl)]
    assert names == ["spf", "dkim", "arc", "dmarc"]
    off = build_config({"spf": {"enabled": False}, "arc": {"enabled": False}, "dmarc": {"enabled": False}})
    checks: list[Check] = build_auth_checks(off, resolver, metrics, psl=psl)
    assert [c.name for c in checks] == ["dkim", "authres"]
    assert isinstance(checks[-1], AuthResultsCheck)


async def test_signed_aligned_message_passes_with_header(harness: Any, key: KeyPair) -> None:
    h = harness()
    outcome, txn = await h.run(sign(message(), key))
    assert outcome.action is Action.CONTINUE
    ar = ar_of(outcome)
    assert ar.authserv_id == ID
    assert [(r.method, r.result) for r in ar.results] == [
        ("spf", "pass"),
        ("dkim", "pass"),
        ("arc", "none"),
        ("dmarc", "pass"),
    ]
    dkim_results = txn.results["dkim"]
    assert isinstance(dkim_results, list) and [r.result for r in dkim_results] == ["pass"]
    assert txn.results["dmarc"].result == "pass"
    assert h.sample("smtpproxy_auth_results_total", {"method": "dkim", "result": "pass"}) == 1
    assert h.sample("smtpproxy_auth_results_total", {"method": "dmarc", "result": "pass"}) == 1


async def test_unsigned_message_records_dkim_none(harness: Any) -> None:
    outcome, txn = await harness().run(message())
    assert [r.result for r in txn.results["dkim"]] == ["none"]
    assert outcome.action is Action.CONTINUE  # SPF for example.org passes and aligns


async def test_spoofed_from_is_rejected_per_policy(harness: Any) -> None:
    h = harness()
    outcome, _ = await h.run(message(from_="Bank <ceo@example.org>"), mail_from="x@evil.example")
    assert outcome.action is Action.REJECT
    assert outcome.reply is not None
    assert outcome.reply.render() == "550 5.7.1 Email rejected per DMARC policy for example.org"
    assert h.sample("smtpproxy_dmarc_policy_applied_total", {"policy": "reject", "enforced": "true"}) == 1


async def test_quarantine_policy_marks_message(harness: Any) -> None:
    h = harness()
    outcome, _ = await h.run(message(from_="a@quarantine.example"), mail_from="x@evil.example")
    assert outcome.action is Action.QUARANTINE
    added = {e.name: e.value for e in outcome.header_edits if e.kind is HeaderEditKind.ADD}
    assert added["X-Quarantine"] == "DMARC policy quarantine for quarantine.example"
    assert "Authentication-Results" in added


@pytest.mark.parametrize("overrides", [{"report_only": True}, {"enforce": False}])
async def test_report_only_and_not_enforcing_record_but_deliver(
    harness: Any, overrides: dict[str, Any]
) -> None:
    h = harness(dmarc=overrides)
    outcome, txn = await h.run(message(from_="ceo@example.org"), mail_from="x@evil.example")
    assert outcome.action is Action.CONTINUE
    assert txn.results["dmarc"].result == "fail"
    assert [r.result for r in ar_of(outcome).results if r.method == "dmarc"] == ["fail"]
    assert h.sample("smtpproxy_dmarc_policy_applied_total", {"policy": "reject", "enforced": "false"}) == 1


async def test_dns_failure_tempfails_unless_accepted(harness: Any) -> None:
    outcome, _ = await harness().run(message(from_="a@slow.example"), mail_from="x@evil.example")
    assert outcome.action is Action.TEMPFAIL
    assert outcome.reply is not None and outcome.reply.render().startswith("451 4.4.3 ")
    relaxed, _ = await harness(dmarc={"temperror_action": "accept"}).run(
        message(from_="a@slow.example"), mail_from="x@evil.example"
    )
    assert relaxed.action is Action.CONTINUE


async def test_trusted_arc_sealer_overrides_dmarc_failure(harness: Any, key: KeyPair) -> None:
    # A mailing list rewrote the subject (breaking DKIM) and sealed what it saw.
    signed = sign(message(), key)
    relayed = b"Authentication-Results: lists.example; dkim=pass header.d=example.org\r\n" + signed
    sealed = arc_seal(
        relayed.replace(b"Subject: Hello", b"Subject: [list] Hello"),
        key,
        domain="lists.example",
        srv_id="lists.example",
    )
    trusting = harness(dmarc={"trusted_arc_sealers": ["Lists.Example"]})
    outcome, txn = await trusting.run(sealed, mail_from="bounce@lists.example")
    assert outcome.action is Action.CONTINUE
    assert txn.results["dmarc"].details["override"] == "trusted_arc_sealer"
    strict, _ = await harness().run(sealed, mail_from="bounce@lists.example")
    assert strict.action is Action.REJECT


async def test_authres_check_adds_header_when_dmarc_disabled(harness: Any, key: KeyPair) -> None:
    outcome, _ = await harness(dmarc={"enabled": False}).run(sign(message(), key))
    assert [r.method for r in ar_of(outcome).results] == ["spf", "dkim", "arc"]


async def test_forged_results_are_dropped_and_ours_added(harness: Any, key: KeyPair) -> None:
    forged = f"Authentication-Results: {ID.upper()}; dmarc=pass header.from=example.org\r\n".encode()
    kept = b"Authentication-Results: upstream.example; spf=pass\r\n"
    outcome, txn = await harness().run(forged + kept + sign(message(), key))
    delivered = apply_edits(remove_fields_where(txn.message, forged_filter(ID)), outcome.header_edits)
    fields = [
        line for line in delivered.split(b"\r\n") if line.lower().startswith(b"authentication-results:")
    ]
    assert len(fields) == 2
    assert fields[1] == kept.rstrip()
    assert fields[0].startswith(f"Authentication-Results: {ID};".encode())


# End to end: the real proxy (App wires build_auth_checks) in front of a recording backend.


@pytest.fixture
async def proxy(dns: DnsServer, backend: RecordingBackend, start_proxy: Any) -> Any:
    return await start_proxy({"dns": {"nameservers": [dns.address]}})


async def test_end_to_end_pass_delivers_with_header_and_reject_answers_550(
    proxy: Any, backend: RecordingBackend, key: KeyPair
) -> None:
    host, port = proxy.host, proxy.port
    forged = b"Authentication-Results: mx.test.example; dkim=pass header.d=example.org\r\n"
    async with RawClient(host, port) as client:
        await client.connect()
        reply = await client.send_message(
            "bounce@example.org", ["bob@example.org"], forged + sign(message(), key)
        )
        assert reply.code == 250, reply
        await client.cmd("RSET")
        spoof = await client.send_message(
            "x@evil.example", ["bob@example.org"], message(from_="ceo@example.org")
        )
        assert (spoof.code, spoof.text) == (550, "5.7.1 Email rejected per DMARC policy for example.org")
    assert len(backend.messages) == 1
    delivered = bytes(backend.messages[0].content)
    assert delivered.count(b"Authentication-Results:") == 1
    header = delivered.split(b"\r\n\r\n", 1)[0].decode()
    fields = re.split(r"\r\n(?![ \t])", header)
    (ar_field,) = [f for f in fields if f.startswith("Authentication-Results:")]
    unfolded = " ".join(ar_field.partition(":")[2].split())
    assert len(parse_authentication_results(unfolded).results) == 4
    assert unfolded.startswith("mx.test.example; spf=pass")
    assert "dkim=pass" in unfolded and "dmarc=pass" in unfolded
