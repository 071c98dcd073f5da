"""The submission policy, driven through the policy core with no sockets (the core is sans-io).

A real App is built from a config (passwd file, sender_login, DKIM keys) and
its SessionPolicy is fed the events a submission client would send; the DKIM
signatures it adds are verified against the loopback DNS server.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import argon2
import pytest
import trustme

from smtpproxy.app import App
from smtpproxy.auth.dkim import DkimVerifier
from smtpproxy.config import ConfigError, build_config
from smtpproxy.dns import Resolver
from smtpproxy.policy.core import SessionPolicy
from smtpproxy.rules.fields import FIELDS, EvalContext
from smtpproxy.session import Session, TlsInfo, new_id
from smtpproxy.stages import Stage
from smtpproxy.submission.dkimkeys import generate
from smtpproxy.submission.sasl import Credentials
from smtpproxy.verdict import Reply
from tests.conftest import proxy_config
from tests.dnsserver import DnsServer

OK = Reply(250, "2.1.0", "Ok")
TLS = TlsInfo("TLSv1.3", "TLS_AES_256_GCM_SHA384", 256)


def msg(from_: str = "Alice <alice@example.org>", to: str = "bob@example.net") -> bytes:
    return (
        f"From: {from_}\r\nTo: {to}\r\nSubject: Hello\r\nDate: Mon, 01 Jan 2024 10:00:00 +0000\r\n"
        "Message-ID: <m1@example.org>\r\n\r\nHi Bob\r\n"
    ).encode()


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer({}) as srv:
        yield srv


@pytest.fixture
def make_app(tmp_path: Path, dns: DnsServer) -> Iterator[Any]:
    apps: list[App] = []
    (tmp_path / "var").mkdir()
    cert = trustme.CA().issue_cert("mx.test.example")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    hasher = argon2.PasswordHasher()
    (tmp_path / "users").write_text(f"alice:{hasher.hash('alice pw')}\nbob:{hasher.hash('bob pw')}\n")
    (tmp_path / "senders").write_text("alice: example.org\nbob: bob@example.com\n")
    keys = []
    for selector, kind in (("s2026r", "rsa"), ("s2026e", "ed25519")):
        pem, txt = generate(kind)
        (tmp_path / f"{selector}.key").write_bytes(pem)
        dns.set(f"{selector}._domainkey.example.org", [("TXT", txt)])
        keys.append({"domain": "example.org", "selector": selector, "key": f"{selector}.key"})

    def factory(**overrides: Any) -> App:
        submission = {
            "auth": {"passwd_file": "users"},
            "sender_login": "senders",
            "brute_force": {"max_failures_per_ip": 3, "max_failures_per_user": 3, "tarpit": 0.5},
            **overrides.pop("submission", {}),
        }
        data = proxy_config(
            None,
            {
                "submission": submission,
                "dkim_sign": keys,
                "metrics": None,
                "tls": {"cert": "cert.pem", "key": "key.pem"},
                **overrides,
            },
            tmp_path,
            dns=dns.address,
        )
        app = App(build_config(data, base_dir=tmp_path))
        apps.append(app)
        return app

    yield factory


def session_of(app: App, *, submission: bool = True, tls: bool = True) -> SessionPolicy:
    facts = Session(new_id(), ipaddress.ip_address("192.0.2.7"), 40000, "127.0.0.1", 587)
    facts.submission, facts.tls, facts.helo, facts.esmtp = submission, TLS if tls else None, "laptop", True
    return app.policy.session(facts)


async def login(policy: SessionPolicy, user: str = "alice", password: str = "alice pw") -> Reply | None:
    sub = policy.submission
    assert sub is not None
    assert await sub.auth_start(policy.session, "PLAIN") is None
    outcome = await sub.auth_local(policy.session, "PLAIN", Credentials(user, password))
    return outcome.reply


async def test_auth_before_tls_is_refused_538(make_app: Any) -> None:
    policy = session_of(make_app(), tls=False)
    assert policy.submission is not None
    assert not policy.submission.offers_auth(policy.session)
    outcome = await policy.submission.auth_start(policy.session, "PLAIN")
    assert outcome is not None and outcome.reply is not None
    assert (outcome.reply.code, outcome.reply.enhanced) == (538, "5.7.11")


async def test_good_password_authenticates_and_bad_one_is_535_after_the_tarpit(make_app: Any) -> None:
    app = make_app()
    policy = session_of(app)
    sub = policy.submission
    assert sub is not None
    bad = await sub.auth_local(policy.session, "PLAIN", Credentials("alice", "wrong"))
    assert bad.reply is not None and (bad.reply.code, bad.reply.enhanced) == (535, "5.7.8")
    assert bad.delay == 0.5 and not bad.disconnect
    unknown = await sub.auth_local(policy.session, "LOGIN", Credentials("nobody", "wrong"))
    assert unknown.reply == bad.reply  # never tells whether the user exists
    assert await login(policy) == Reply(235, "2.7.0", "Authentication successful")
    assert (policy.session.auth_user, policy.session.auth_mechanism) == ("alice", "PLAIN")
    again = await sub.auth_start(policy.session, "PLAIN")
    assert again is not None and again.reply is not None and again.reply.code == 503
    value = app.metrics.registry.get_sample_value
    assert value("smtpproxy_auth_attempts_total", {"result": "failure"}) == 2
    assert value("smtpproxy_auth_attempts_total", {"result": "success"}) == 1


async def test_brute_force_reaches_421_and_blocks_the_address_before_any_password(make_app: Any) -> None:
    app = make_app()
    policy = session_of(app)
    sub = policy.submission
    assert sub is not None
    for password in ("a", "b"):
        assert (await sub.auth_local(policy.session, "PLAIN", Credentials("bob", password))).reply == Reply(
            535, "5.7.8", "Authentication credentials invalid"
        )
    third = await sub.auth_local(policy.session, "PLAIN", Credentials("carol", "c"))
    assert third.reply is not None and (third.reply.code, third.reply.enhanced) == (421, "4.7.0")
    assert third.disconnect
    # A new connection from the address: refused at AUTH even with the right password.
    fresh = session_of(app)
    assert fresh.submission is not None
    start = await fresh.submission.auth_start(fresh.session, "PLAIN")
    assert start is not None and start.reply is not None and start.reply.code == 421 and start.disconnect
    assert (
        await fresh.submission.auth_local(fresh.session, "PLAIN", Credentials("bob", "bob pw"))
    ).disconnect
    assert fresh.session.auth_user is None


async def test_mail_without_auth_is_530_and_the_session_goes_on(make_app: Any) -> None:
    policy = session_of(make_app())
    decision = await policy.mail("alice@example.org", ())
    assert decision.reply is not None and (decision.reply.code, decision.reply.enhanced) == (530, "5.7.0")
    assert not decision.disconnect
    await login(policy)
    assert (await policy.mail("alice@example.org", ())).forward


async def test_sender_login_mismatch_at_mail_and_in_the_header_from_is_553(make_app: Any) -> None:
    policy = session_of(make_app())
    await login(policy, "bob", "bob pw")
    refused = await policy.mail("alice@example.org", ())
    assert refused.reply is not None and (refused.reply.code, refused.reply.enhanced) == (553, "5.7.1")
    assert "not owned by user bob" in refused.reply.text
    assert (await policy.mail("bob@example.com", ())).forward
    policy.mail_answered(OK)
    assert (await policy.rcpt("carol@example.net", ())).forward
    policy.rcpt_answered("carol@example.net", (), Reply(250, "2.1.5", "Ok"))
    delivery = await policy.data(msg(from_="Alice <alice@example.org>"))
    assert delivery.reply is not None and (delivery.reply.code, delivery.reply.enhanced) == (553, "5.7.1")
    assert delivery.message is None


async def test_authenticated_mail_relays_is_signed_says_esmtpsa_and_has_no_auth_results(
    make_app: Any, dns: DnsServer
) -> None:
    policy = session_of(make_app())
    await login(policy)
    assert (await policy.mail("alice@example.org", ())).forward
    policy.mail_answered(OK)
    # Not one of relay_domains: an authenticated client may send anywhere.
    assert (await policy.rcpt("carol@elsewhere.example", ())).forward
    policy.rcpt_answered("carol@elsewhere.example", (), Reply(250, "2.1.5", "Ok"))
    delivery = await policy.data(msg())
    assert delivery.message is not None
    head = delivery.message.split(b"\r\n\r\n")[0]
    assert b"with ESMTPSA id" in head
    assert b"Authenticated sender" not in head  # off by default
    assert b"Authentication-Results" not in head
    resolver = Resolver([dns.address], timeout=2.0)
    try:
        results = await DkimVerifier(resolver).verify(delivery.message)
    finally:
        await resolver.close()
    assert [(r.result, r.domain, r.algorithm) for r in results] == [
        ("pass", "example.org", "rsa-sha256"),
        ("pass", "example.org", "ed25519-sha256"),
    ]


async def test_received_names_the_user_when_asked(make_app: Any) -> None:
    policy = session_of(make_app(submission={"received_user": True}))
    await login(policy)
    await policy.mail("alice@example.org", ())
    policy.mail_answered(OK)
    await policy.rcpt("bob@example.net", ())
    policy.rcpt_answered("bob@example.net", (), Reply(250, "2.1.5", "Ok"))
    delivery = await policy.data(msg())
    assert delivery.message is not None
    assert b"(Authenticated sender: alice)" in delivery.message.split(b"\r\n\r\n")[0]


async def test_inbound_sessions_keep_relay_check_and_auth_results(make_app: Any) -> None:
    policy = session_of(make_app(), submission=False)
    assert policy.submission is None
    assert (await policy.mail("someone@example.net", ())).forward
    policy.mail_answered(OK)
    refused = await policy.rcpt("carol@elsewhere.example", ())
    assert refused.reply is not None and refused.reply.code == 550
    assert (await policy.rcpt("bob@example.org", ())).forward
    policy.rcpt_answered("bob@example.org", (), Reply(250, "2.1.5", "Ok"))
    delivery = await policy.data(msg(from_="someone@example.net"))
    assert delivery.message is not None
    head = delivery.message.split(b"\r\n\r\n")[0]
    assert b"Authentication-Results: mx.test.example" in head
    assert b"DKIM-Signature" not in head and b"ESMTPSA" not in head


async def test_per_user_rate_limit_by_auth_user(make_app: Any) -> None:
    app = make_app(ratelimits=[{"name": "per_user", "key": "auth_user", "rate": "1/hour"}])
    first = session_of(app)
    await login(first)
    assert (await first.mail("alice@example.org", ())).forward
    first.mail_answered(OK)
    first.end("rset", "mail", "rset")
    second = await first.mail("alice@example.org", ())
    assert second.reply is not None and (second.reply.code, second.reply.enhanced) == (450, "4.7.1")
    assert "per_user" in second.reply.text
    # Another user has a budget of their own.
    other = session_of(app)
    await login(other, "bob", "bob pw")
    assert (await other.mail("bob@example.com", ())).forward


async def test_rule_fields_auth_user_and_mechanism(make_app: Any) -> None:
    policy = session_of(make_app())
    ctx = EvalContext(policy.session, None, Stage.MAIL)
    assert ctx.values(FIELDS["auth.user"]) == ()
    await login(policy)
    ctx = EvalContext(policy.session, None, Stage.MAIL)
    assert ctx.values(FIELDS["auth.user"]) == ("alice",)
    assert ctx.values(FIELDS["auth.mechanism"]) == ("PLAIN",)


async def test_sighup_reloads_users_and_signing_keys(make_app: Any, tmp_path: Path, dns: DnsServer) -> None:
    app = make_app()
    (tmp_path / "users").write_text(f"dave:{argon2.PasswordHasher().hash('dave pw')}\n")
    (tmp_path / "senders").write_text("dave: example.org\n")
    pem, txt = generate("rsa")
    (tmp_path / "s2026r.key").write_bytes(pem)
    app.reload()
    policy = session_of(app)
    assert await login(policy, "alice", "alice pw") != Reply(235, "2.7.0", "Authentication successful")
    assert (await login(policy, "dave", "dave pw")) == Reply(235, "2.7.0", "Authentication successful")
    assert app.submission is not None and app.submission.signer is not None
    signer = app.submission.signer
    dns.set("s2026r._domainkey.example.org", [("TXT", txt)])
    signed = signer.sign(msg(), "example.org")
    resolver = Resolver([dns.address], timeout=2.0)
    try:
        assert [r.result for r in await DkimVerifier(resolver).verify(signed)] == ["pass", "pass"]
    finally:
        await resolver.close()


def test_submission_without_tls_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"rules": None, "submission": {}}, base_dir=tmp_path)
    assert err.value.problems == [
        "(top level): submission: expected tls.cert and tls.key to be set "
        "(AUTH is offered only over TLS), got tls.cert: null"
    ]


def test_a_bad_passwd_file_stops_the_start_naming_it(make_app: Any, tmp_path: Path) -> None:
    (tmp_path / "users").write_text("alice:plain\n")
    with pytest.raises(ValueError, match=r"users, line 1: expected an argon2id"):
        make_app()


def test_auth_backend_is_refused_at_start_naming_the_key(make_app: Any) -> None:
    with pytest.raises(ValueError, match=r"submission.auth: 'backend' is not supported by this version yet"):
        make_app(submission={"auth": "backend"})


def test_the_readme_submission_example_is_a_valid_config() -> None:
    import yaml

    from smtpproxy.config import Config

    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    block = text.split("## Submission", 1)[1].split("```yaml\n", 1)[1].split("```", 1)[0]
    config = Config.model_validate(yaml.safe_load(block))
    assert config.submission is not None and config.submission.listen_tls == "0.0.0.0:465"
    assert [k.selector for k in config.dkim_sign] == ["s2026r", "s2026e"]
