"""Per-connection limits: each limit, its reply, its metric, the tarpit."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from smtpproxy.config import ConfigError, SessionLimitsConfig, build_config
from smtpproxy.metrics import Metrics
from smtpproxy.ratelimit.session_limits import SessionLimits
from smtpproxy.session import Session
from smtpproxy.verdict import Verdict


def make(**limits: Any) -> tuple[SessionLimits, Metrics, Session]:
    metrics = Metrics(process=False)
    config = build_config({"session_limits": limits}).session_limits
    s = Session("S", ipaddress.ip_address("192.0.2.1"), 1, "127.0.0.1", 25, started=100.0)
    return SessionLimits(config, metrics), metrics, s


def hits(metrics: Metrics, limit: str) -> float:
    return metrics.registry.get_sample_value("smtpproxy_session_limit_hits_total", {"limit": limit}) or 0.0


def closing(verdict: Verdict | None, rendered: str) -> None:
    assert verdict is not None and verdict.reply is not None
    assert verdict.reply.render() == rendered
    assert verdict.disconnect


def test_defaults_are_documented_values() -> None:
    c = SessionLimitsConfig()
    assert (c.max_transactions, c.max_invalid_commands, c.max_rejected_recipients) == (None, 10, 20)
    assert (c.max_errors, c.max_duration, c.tarpit_delay) == (50, 3600.0, 0.0)


def test_dictionary_attack_closes_after_max_rejected_recipients() -> None:
    limits, metrics, s = make(max_rejected_recipients=3, max_errors=None)
    for _ in range(3):
        assert limits.on_command_error(s, "rejected_rcpt") is None
    closing(limits.on_command_error(s, "rejected_rcpt"), "421 4.7.0 Too many rejected recipients, closing")
    assert s.rejected_recipients == 4 and s.errors == 4
    assert hits(metrics, "max_rejected_recipients") == 1


@pytest.mark.parametrize("kind", ["invalid_command", "syntax"])
def test_invalid_commands_close_after_the_limit(kind: str) -> None:
    limits, metrics, s = make(max_invalid_commands=2)
    assert limits.on_command_error(s, kind) is None
    assert limits.on_command_error(s, kind) is None
    closing(limits.on_command_error(s, kind), "421 4.7.0 Too many invalid commands, closing")
    assert s.invalid_commands == 3 and hits(metrics, "max_invalid_commands") == 1


def test_every_kind_counts_toward_max_errors() -> None:
    limits, metrics, s = make(max_errors=3, max_invalid_commands=None, max_rejected_recipients=None)
    for kind in ("error", "syntax", "rejected_rcpt"):
        assert limits.on_command_error(s, kind) is None
    closing(limits.on_command_error(s, "error"), "421 4.7.0 Too many errors, closing")
    assert s.errors == 4 and hits(metrics, "max_errors") == 1


def test_null_limits_mean_unlimited() -> None:
    limits, _, s = make(max_errors=None, max_invalid_commands=None, max_rejected_recipients=None)
    for _ in range(1000):
        assert limits.on_command_error(s, "rejected_rcpt") is None


def test_unknown_error_kind_is_a_programming_error() -> None:
    limits, _, s = make()
    with pytest.raises(ValueError, match="error kind"):
        limits.on_command_error(s, "oops")


async def test_max_transactions_is_an_older_spelling_of_max_messages_per_connection() -> None:
    """One setting per limit: the old key still limits MAIL commands, through the one check, and says so."""
    import ipaddress

    from smtpproxy.config import build_config
    from smtpproxy.core_checks import LimitsCheck
    from smtpproxy.session import Session, Transaction

    config = build_config({"session_limits": {"max_transactions": 2}})
    assert config.max_messages_per_connection == 2
    assert config.spelling_notes and "limits.max_messages_per_connection" in config.spelling_notes[0]
    check = LimitsCheck(config.limits, config.max_messages_per_connection)
    s = Session("S", ipaddress.ip_address("192.0.2.1"), 1, "127.0.0.1", 25)
    assert await check.mail(s, Transaction("T", "a@b.example")) is None
    s.transactions = 2  # the policy counts the MAIL commands the backend accepted
    verdict = await check.mail(s, Transaction("T", "a@b.example"))
    assert verdict is not None and verdict.disconnect
    assert str(verdict.reply) == "421 4.7.0 Too many messages in this connection, closing"
    # Both set: the lower wins; neither: the documented default, and nothing to say.
    both = build_config(
        {"session_limits": {"max_transactions": 50}, "limits": {"max_messages_per_connection": 7}}
    )
    assert both.max_messages_per_connection == 7
    assert build_config({}).max_messages_per_connection == 100 and build_config({}).spelling_notes == []


def test_max_duration() -> None:
    limits, metrics, s = make(max_duration=60)
    assert limits.duration_exceeded(s, now=160.0) is None
    closing(limits.duration_exceeded(s, now=160.5), "421 4.4.2 Connection time limit exceeded, closing")
    assert hits(metrics, "max_duration") == 1
    off, _, s2 = make(max_duration=None)
    assert off.duration_exceeded(s2, now=1e9) is None


def test_tarpit_grows_with_errors_up_to_its_cap() -> None:
    limits, _, s = make(tarpit_delay=1.0, tarpit_max=2.5, max_errors=None)
    assert limits.tarpit_delay(s) == 0.0  # no errors yet: no delay
    delays = []
    for _ in range(4):
        limits.on_command_error(s, "error")
        delays.append(limits.tarpit_delay(s))
    assert delays == [1.0, 2.0, 2.5, 2.5]
    off, _, s2 = make()
    off.on_command_error(s2, "error")
    assert off.tarpit_delay(s2) == 0.0


@pytest.mark.parametrize(
    ("limits", "key"),
    [
        ({"max_errors": 0}, "session_limits.max_errors"),
        ({"max_duration": -5}, "session_limits.max_duration"),
        ({"tarpit_delay": -1}, "session_limits.tarpit_delay"),
        ({"max_rcpts": 3}, "session_limits.max_rcpts: unknown key"),
    ],
)
def test_bad_session_limits_name_the_key(limits: dict[str, Any], key: str) -> None:
    with pytest.raises(ConfigError, match=key):
        build_config({"session_limits": limits})
