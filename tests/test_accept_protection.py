"""Accept ends filtering, never protection: no relay, no lifted limits through an accept rule.

Attacks the README's "What the proxy guarantees": a forged sender that an
allow-list rule accepts, an accept at every stage, routed local parts that a
trusting backend (Postfix and its default ``mynetworks``) would relay onward.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message

QUIET = {"spf": {"enabled": False}, "dkim": {"enabled": False}, "arc": {"enabled": False}}
QUIET["dmarc"] = {"enabled": False}

# The seven routed forms that relayed through the proxy and a default Postfix 3.7,
# and their cousins; every one names a relayed domain on the right.
ROUTED = (
    "<user%evil.example@example.org>",
    "user%evil.example@example.org",
    '<"user%evil.example"@example.org>',
    '<"user@evil.example"@example.org>',
    "<evil.example!user@example.org>",
    '<"evil.example!user"@example.org>',
    "<user%evil.example%example.org@example.org>",
    '<"user\\@evil.example"@example.org>',
    "<USER%EVIL.EXAMPLE@EXAMPLE.ORG>",
)


def write_rules(folder: Path, rules: list[dict[str, Any]]) -> None:
    """One rule file; YAML is a superset of JSON, so the rules are written as JSON."""
    import json

    folder.mkdir(exist_ok=True)
    (folder / "10-test.yaml").write_text(json.dumps({"rules": rules}))


ALLOW_PARTNER = {
    "name": "allow_partner",
    "stage": "mail",
    "if": {"mail_from.domain": "partner.example"},
    "then": "accept",
}


async def dialogue(proxy: Any, sender: str, rcpts: list[str], *, helo: str = "client.test") -> list[int]:
    """EHLO, MAIL, each RCPT, and DATA when one was accepted; the codes of MAIL, RCPTs and DATA."""
    codes: list[int] = []
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220
        assert (await c.cmd(f"EHLO {helo}")).code == 250
        r = await c.cmd(f"MAIL FROM:<{sender}>")
        codes.append(r.code)
        if r.code != 250:
            return codes
        for rcpt in rcpts:
            r = await c.cmd(f"RCPT TO:{rcpt if rcpt.startswith('<') else '<' + rcpt + '>'}")
            if r.code == 550:
                assert r.text.startswith("5.7.1"), r
            codes.append(r.code)
        if 250 in codes[1:]:
            assert (await c.cmd("DATA")).code == 354
            codes.append((await c.cmd(make_message() + b".")).code)
        await c.cmd("QUIT")
    return codes


def backend_rcpts(backend: RecordingBackend) -> list[str]:
    return [cmd[len("RCPT ") :] for cmd in backend.commands if cmd.startswith("RCPT ")]


async def test_accept_rule_for_a_forged_sender_does_not_open_the_relay(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    write_rules(tmp_path / "rules", [ALLOW_PARTNER])
    proxy = await start_proxy({**QUIET, "rules": str(tmp_path / "rules"), "limits": {"max_recipients": 2}})
    rcpts = [
        "victim@elsewhere.example",
        "user@example.org",
        "a@example.org",
        "b@example.org",
        "c@example.org",
    ]
    codes = await dialogue(proxy, "x@partner.example", rcpts)
    # MAIL, relay denied, two accepted, then the recipient limit for the rest; delivered.
    assert codes == [250, 550, 250, 250, 452, 452, 250]
    assert backend_rcpts(backend) == ["user@example.org", "a@example.org"]
    assert backend.messages[0].rcpts == ["user@example.org", "a@example.org"]


async def test_accept_at_connect_and_helo_does_not_open_the_relay(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    rules = [
        {"name": "allow_loopback", "stage": "connect", "if": {"client.ip": {"cidr": ["127.0.0.0/8"]}}},
        {"name": "allow_helo", "stage": "helo", "if": {"helo": "partner.example"}},
    ]
    for rule in rules:
        rule["then"] = "accept"
        write_rules(tmp_path / "rules", [rule])
        proxy = await start_proxy({**QUIET, "rules": str(tmp_path / "rules")})
        codes = await dialogue(
            proxy, "x@partner.example", ["victim@elsewhere.example"], helo="partner.example"
        )
        assert codes == [250, 550], rule
    assert backend_rcpts(backend) == []


async def test_accept_rule_does_not_lift_rate_limits(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    # Accepted at connect: every later stage, the rate limit's included, is after the accept.
    allow = {
        "name": "allow",
        "stage": "connect",
        "if": {"client.ip": {"cidr": ["127.0.0.0/8"]}},
        "then": "accept",
    }
    write_rules(tmp_path / "rules", [allow])
    limit = {"name": "per_client", "key": "client_ip", "on": "mail", "rate": "2/hour", "burst": 2}
    proxy = await start_proxy({**QUIET, "rules": str(tmp_path / "rules"), "ratelimits": [limit]})
    seen = [(await dialogue(proxy, "x@partner.example", ["user@example.org"]))[0] for _ in range(3)]
    assert seen == [250, 250, 450]


async def test_relay_networks_may_relay_others_may_not(backend: RecordingBackend, start_proxy) -> None:
    inside = await start_proxy({**QUIET, "relay_networks": ["127.0.0.0/8"]})
    assert await dialogue(inside, "me@example.org", ["friend@elsewhere.example"]) == [250, 250, 250]
    outside = await start_proxy({**QUIET, "relay_networks": ["192.0.2.0/24", "2001:db8::/32"]})
    assert await dialogue(outside, "me@example.org", ["friend@elsewhere.example"]) == [250, 550]
    assert backend_rcpts(backend) == ["friend@elsewhere.example"]


async def test_routed_local_parts_are_refused_for_every_client_and_domain(
    backend: RecordingBackend, start_proxy
) -> None:
    # Even a client allowed to relay: the routing would happen behind us, unseen.
    for overrides in ({}, {"relay_networks": ["127.0.0.0/8"]}):
        proxy = await start_proxy({**QUIET, **overrides})
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            await c.cmd("EHLO client.test")
            assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
            for rcpt in ROUTED:
                r = await c.cmd(f"RCPT TO:{rcpt}")
                assert (r.code, r.text[:5]) == (550, "5.7.1"), (rcpt, r, overrides)
            # The session goes on: an ordinary recipient is still accepted.
            assert (await c.cmd("RCPT TO:<user@example.org>")).code == 250
    assert backend_rcpts(backend) == ["user@example.org", "user@example.org"]


# -- the property: whatever the accept rules, protection holds ---------------------------

CONDITIONS = {
    "connect": [{"client.ip": {"cidr": ["127.0.0.0/8"]}}],
    "helo": [{"helo": "partner.example"}, {"helo": {"regex": "."}}],
    "mail": [{"mail_from.domain": "partner.example"}, {"mail_from.local": {"regex": "."}}],
    "rcpt": [{"rcpt.domain": "elsewhere.example"}, {"rcpt.local": {"regex": "."}}],
    "data": [{"header.subject": {"contains": "Test"}}],
}
OTHER_ACTIONS = ["stop", {"score": -50}, {"add_header": {"name": "X-Allowed", "value": "yes"}}]

stages = st.sampled_from(list(CONDITIONS))


@st.composite
def rule_sets(draw: st.DrawFn) -> list[dict[str, Any]]:
    """One to four rules, at least one of them an accept, at any stage, conditions that match."""
    count = draw(st.integers(1, 4))
    rules = []
    for i in range(count):
        stage = draw(stages)
        then: Any = "accept" if i == 0 else draw(st.sampled_from(["accept", *OTHER_ACTIONS]))
        rules.append(
            {"name": f"r{i}", "stage": stage, "if": draw(st.sampled_from(CONDITIONS[stage])), "then": then}
        )
    return draw(st.permutations(rules))


recipients = st.lists(
    st.sampled_from(
        ["user@example.org", "a@sub.example.org", "victim@elsewhere.example", "v@[192.0.2.1]", *ROUTED[:4]]
    ),
    min_size=1,
    max_size=6,
)

GENERATED: list[int] = []  # how many rule sets ran, for the note


@settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rules=rule_sets(), rcpts=recipients, max_recipients=st.integers(1, 3))
async def test_no_accept_rule_set_opens_the_relay_or_lifts_limits(
    backend: RecordingBackend,
    start_proxy,
    tmp_path: Path,
    rules: list[dict[str, Any]],
    rcpts: list[str],
    max_recipients: int,
) -> None:
    folder = tmp_path / "rules"
    write_rules(folder, rules)
    proxy = await start_proxy(
        {
            **QUIET,
            "relay_domains": ["example.org", ".example.org"],
            "rules": str(folder),
            "limits": {"max_recipients": max_recipients},
            "rules_options": {"reload_interval": 0},
        }
    )
    backend.commands.clear()
    codes = await dialogue(proxy, "x@partner.example", rcpts, helo="partner.example")
    await proxy.app.stop(grace=0)
    GENERATED.append(1)
    assert codes[0] == 250
    accepted = 0
    for rcpt, code in zip(rcpts, codes[1:], strict=False):
        inside = rcpt in ("user@example.org", "a@sub.example.org")
        if not inside:
            assert code == 550, (rules, rcpt, codes)
        elif accepted >= max_recipients:
            assert code == 452, (rules, rcpt, codes)
        else:
            assert code == 250, (rules, rcpt, codes)
            accepted += 1
    sent = backend_rcpts(backend)
    assert all(r in ("user@example.org", "a@sub.example.org") for r in sent), (rules, sent)
    assert len(sent) <= max_recipients
