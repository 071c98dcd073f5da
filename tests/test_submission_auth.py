"""AUTH building blocks: SASL decoding, the passwd file (argon2id and bcrypt), brute-force counting."""

from __future__ import annotations

import base64
import logging
import time
from pathlib import Path

import argon2
import bcrypt
import pytest

from smtpproxy.config import build_config
from smtpproxy.config.submission import BruteForceConfig
from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.check import build_ratelimiter
from smtpproxy.ratelimit.memory import MemoryStore
from smtpproxy.submission import sasl
from smtpproxy.submission.bruteforce import AuthGuard
from smtpproxy.submission.passwd import PasswdError, PasswdFile, parse

TLS = {"cert": "/nonexistent/cert.pem", "key": "/nonexistent/key.pem"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


# -- SASL ----------------------------------------------------------------------------


def test_plain_decodes_user_and_password_and_hides_the_password_in_repr() -> None:
    creds = sasl.plain(sasl.decode_base64(base64.b64encode(b"\0alice\0s3cret pw").decode()))
    assert (creds.user, creds.password) == ("alice", "s3cret pw")
    assert "s3cret" not in repr(creds)


@pytest.mark.parametrize(
    "raw",
    [
        b"alice\0pw",
        b"\0\0pw",
        b"bob\0alice\0pw",
        b"\0al\x01ice\0pw",
        b"\0" + b"a" * 256 + b"\0pw",
        b"\0\xff\0pw",
    ],
)
def test_plain_refuses_malformed_responses_without_quoting_them(raw: bytes) -> None:
    with pytest.raises(sasl.SaslError) as err:
        sasl.plain(raw)
    assert "pw" not in str(err.value)


def test_base64_is_validated_and_equals_is_empty() -> None:
    assert sasl.decode_base64("=") == b""
    with pytest.raises(sasl.SaslError):
        sasl.decode_base64("not base64!")


def test_login_challenges_are_the_usual_ones() -> None:
    assert base64.b64decode(sasl.LOGIN_USER_CHALLENGE) == b"Username:"
    assert base64.b64decode(sasl.LOGIN_PASSWORD_CHALLENGE) == b"Password:"


# -- passwd_file ---------------------------------------------------------------------


@pytest.fixture
def passwd(tmp_path: Path) -> Path:
    path = tmp_path / "users"
    path.write_text(
        "# users of example.org\n"
        f"alice:{argon2.PasswordHasher().hash('alice pw')}\n"
        "\n"
        f"bob:{bcrypt.hashpw(b'bob pw', bcrypt.gensalt(rounds=4)).decode()}\n"
    )
    return path


def test_argon2id_and_bcrypt_users_verify(passwd: Path) -> None:
    users = PasswdFile(passwd)
    assert len(users) == 2
    assert users.verify("alice", "alice pw")
    assert users.verify("bob", "bob pw")
    assert not users.verify("alice", "bob pw")
    assert not users.verify("bob", "")
    assert not users.verify("carol", "alice pw")


def test_an_unknown_user_costs_a_hash_like_a_wrong_password(passwd: Path) -> None:
    users = PasswdFile(passwd)

    def seconds(user: str) -> float:
        start = time.perf_counter()
        for _ in range(3):
            users.verify(user, "wrong")
        return time.perf_counter() - start

    # Not a speed assertion: an unknown user must not answer without hashing (~0 s).
    assert seconds("nobody") > seconds("alice") / 20


async def test_verify_async_runs_off_the_event_loop(passwd: Path) -> None:
    assert await PasswdFile(passwd).verify_async("alice", "alice pw")


@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("alice\n", "line 1: expected user:hash"),
        ("alice:plaintext\n", "line 1: expected an argon2id ($argon2id$...) or bcrypt ($2b$...) hash"),
        ("# c\nal ice:$2b$x\n", "line 2: expected user:hash"),
        ("a:$2b$x\na:$2b$y\n", "line 2: user 'a' is listed twice"),
    ],
)
def test_bad_lines_are_named_without_their_hash(text: str, error: str) -> None:
    with pytest.raises(PasswdError) as err:
        parse(text, "/etc/smtpproxy/users")
    assert str(err.value).startswith("/etc/smtpproxy/users, ")
    assert error in str(err.value)
    assert "plaintext" not in str(err.value)


def test_reload_takes_new_users_and_a_bad_file_keeps_the_old(
    passwd: Path, caplog: pytest.LogCaptureFixture
) -> None:
    users = PasswdFile(passwd)
    passwd.write_text(f"carol:{argon2.PasswordHasher().hash('carol pw')}\n")
    assert users.reload()
    assert users.verify("carol", "carol pw") and not users.verify("alice", "alice pw")
    passwd.write_text("broken line\n")
    with caplog.at_level(logging.ERROR):
        assert not users.reload()
    assert users.verify("carol", "carol pw")
    assert "line 1: expected user:hash" in caplog.text


def test_config_names_passwd_file() -> None:
    from smtpproxy.config import Config

    config = Config.model_validate({"submission": {"auth": {"passwd_file": "/etc/users"}}, "tls": TLS})
    assert config.submission is not None
    assert config.submission.auth != "backend"
    assert Config.model_validate({"submission": {}, "tls": TLS}).submission.auth == "backend"  # type: ignore[union-attr]


# -- brute force -------------------------------------------------------------------------


def guard(**settings: float) -> tuple[AuthGuard, FakeClock]:
    clock = FakeClock()
    limiter = build_ratelimiter(
        build_config({"rules": None}), Metrics(process=False), MemoryStore(clock=clock)
    )
    limiter.clock = clock
    return AuthGuard(limiter, BruteForceConfig(**settings)), clock


async def test_the_third_failure_of_an_address_reaches_the_limit_and_blocks_it() -> None:
    g, _ = guard(max_failures_per_ip=3, max_failures_per_user=100)
    assert not await g.blocked("192.0.2.1")
    assert not await g.failed("192.0.2.1", "alice")
    assert not await g.failed("192.0.2.1", "bob")
    assert await g.failed("192.0.2.1", "carol")
    # Blocked before any password is looked at, for every user, from this address only.
    assert await g.blocked("192.0.2.1", "dave")
    assert not await g.blocked("192.0.2.2", "dave")


async def test_failures_of_one_user_from_many_addresses_block_the_user() -> None:
    g, _ = guard(max_failures_per_ip=100, max_failures_per_user=2)
    assert not await g.failed("192.0.2.1", "Alice")
    assert await g.failed("192.0.2.2", "alice")
    assert await g.blocked("192.0.2.3", "ALICE")
    assert not await g.blocked("192.0.2.3", "bob")


async def test_a_block_drains_at_the_steady_rate() -> None:
    g, clock = guard(max_failures_per_ip=2, period=60)
    await g.failed("192.0.2.1", None)
    assert await g.failed("192.0.2.1", None)
    clock.now += 31  # one failure forgiven every period / max seconds
    assert not await g.blocked("192.0.2.1")
    assert await g.failed("192.0.2.1", None)


def test_limits_below_two_are_refused_by_the_config() -> None:
    with pytest.raises(Exception, match="greater than or equal to 2"):
        build_config({"rules": None, "tls": TLS, "submission": {"brute_force": {"max_failures_per_ip": 1}}})
