"""Rate-limit keys of each kind, combined keys, and the config shape of ``ratelimits``."""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from smtpproxy.config import ConfigError, build_config
from smtpproxy.ratelimit.keys import KeySpec, build_key, client_net, earliest_stage, key_problem
from smtpproxy.session import Recipient, Session, Transaction

SPEC_EXAMPLE: list[dict[str, Any]] = [
    {"name": "conn_per_ip", "key": "client_ip", "rate": "60/minute", "burst": 20, "on": "connect"},
    {"name": "msgs_per_ip", "key": "client_net", "rate": "500/hour", "burst": 50, "on": "mail"},
    {"name": "rcpts_per_from", "key": "sender_domain", "rate": "2000/hour", "burst": 200, "on": "rcpt"},
    {"name": "per_rcpt", "key": "recipient", "rate": "100/minute", "on": "rcpt"},
    {"name": "concurrent", "key": "client_ip", "concurrency": 10},
]


def session(ip: str = "192.0.2.77", helo: str | None = "Mail.Example.NET") -> Session:
    return Session("S1", ipaddress.ip_address(ip), 40000, "127.0.0.1", 25, helo=helo)


TXN = Transaction("T1", "Alice@Example.COM")
RCPT = Recipient("Bob@Dest.Example")


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        (("client_ip",), "l:192.0.2.77"),
        (("client_net",), "l:192.0.2.0/24"),
        (("helo",), "l:mail.example.net"),
        (("sender",), "l:alice@example.com"),
        (("sender_domain",), "l:example.com"),
        (("recipient",), "l:bob@dest.example"),
        (("recipient_domain",), "l:dest.example"),
        (("client_ip", "sender_domain"), "l:192.0.2.77|example.com"),
        (("sender", "recipient"), "l:alice@example.com|bob@dest.example"),
    ],
)
def test_each_key_kind_and_combinations(kinds: tuple[str, ...], expected: str) -> None:
    assert build_key("l", KeySpec(kinds), session(), TXN, RCPT) == expected


def test_client_net_ipv6_defaults_to_64_and_prefixes_are_configurable() -> None:
    s6 = session("2001:db8:1:2:3:4:5:6")
    assert build_key("l", KeySpec(("client_net",)), s6) == "l:2001:db8:1:2::/64"
    assert build_key("l", KeySpec(("client_net",), 16, 48), s6) == "l:2001:db8:1::/48"
    assert build_key("l", KeySpec(("client_net",), 16, 48), session()) == "l:192.0.0.0/16"


def test_ipv4_mapped_client_counts_as_its_ipv4_address() -> None:
    mapped = session("::ffff:192.0.2.77")
    assert build_key("l", KeySpec(("client_ip",)), mapped) == "l:192.0.2.77"
    assert build_key("l", KeySpec(("client_net",)), mapped) == "l:192.0.2.0/24"


def test_null_sender_has_its_own_key() -> None:
    null = Transaction("T2", "")
    assert build_key("l", KeySpec(("sender", "sender_domain")), session(), null) == "l:<>|<>"


def test_hostile_values_are_hashed_and_separators_escaped() -> None:
    long_helo = session(helo="x" * 500)
    key = build_key("l", KeySpec(("helo",)), long_helo)
    assert key.startswith("l:#") and len(key) == 2 + 1 + 32
    ctrl = session(helo="a\x00b")
    assert "\x00" not in build_key("l", KeySpec(("helo",)), ctrl)
    # "a|b" + "c" must not collide with "a" + "b|c".
    one = build_key("l", KeySpec(("helo", "sender_domain")), session(helo="a|b"), Transaction("T", "x@c"))
    two = build_key("l", KeySpec(("helo", "sender_domain")), session(helo="a"), Transaction("T", "x@b|c"))
    assert one != two


def test_key_availability_by_stage() -> None:
    assert earliest_stage(("client_ip", "sender_domain")) == "mail"
    assert earliest_stage(("recipient",)) == "rcpt"
    assert key_problem(("sender",), "connect") is not None
    assert key_problem(("recipient",), "data") is not None
    assert key_problem(("helo", "sender"), "data") is None


def test_the_documented_example_config_validates() -> None:
    config = build_config({"ratelimits": SPEC_EXAMPLE, "ratelimit_store": "redis://127.0.0.1:6379/0"})
    by_name = {item.name: item for item in config.ratelimits}
    assert by_name["per_rcpt"].effective_burst == 100  # rate-derived default
    assert by_name["conn_per_ip"].effective_burst == 20
    assert by_name["concurrent"].stage == "connect"
    assert config.ratelimit_fail == "open" and config.ratelimit_store_timeout == 0.25


def test_defaults_mean_no_limits_and_the_memory_store() -> None:
    config = build_config({})
    assert config.ratelimits == [] and config.ratelimit_store == "memory"


def test_combined_key_as_list_or_plus_shorthand_and_inferred_stage() -> None:
    config = build_config(
        {
            "ratelimits": [
                {"name": "a", "key": ["client_ip", "sender_domain"], "rate": "10/hour"},
                {"name": "b", "key": "client_ip+recipient_domain", "rate": "10/hour"},
            ]
        }
    )
    assert config.ratelimits[0].key == ["client_ip", "sender_domain"]
    assert config.ratelimits[0].stage == "mail"
    assert config.ratelimits[1].stage == "rcpt"


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ({"name": "x", "key": "client_ip"}, "either rate"),
        ({"name": "x", "key": "client_ip", "rate": "1/hour", "concurrency": 2}, "either rate"),
        ({"name": "x", "key": "client_ip", "rate": "ten/hour"}, "rate like 60/minute"),
        ({"name": "x", "key": "client_port", "rate": "1/hour"}, "key kinds among"),
        ({"name": "x", "key": "sender", "rate": "1/hour", "on": "connect"}, "not known before"),
        ({"name": "x", "key": "recipient", "rate": "1/hour", "on": "mail"}, "not known before"),
        ({"name": "x", "key": "recipient", "rate": "1/hour", "on": "data"}, "needs on: rcpt"),
        ({"name": "x", "key": "sender_domain", "concurrency": 3}, "client_ip or client_net"),
        ({"name": "x", "key": "client_ip", "concurrency": 3, "burst": 2}, "no burst"),
        ({"name": "x y", "key": "client_ip", "rate": "1/hour"}, "pattern"),
        ({"name": "x", "key": "client_ip", "rate": "1/hour", "exempt": ["10.0.0.300/8"]}, "CIDR"),
        ({"name": "x", "key": "client_ip", "rate": "1/hour", "on": "quit"}, "ratelimits.0.on"),
        ({"name": "x", "key": "client_ip", "rate": "1/hour", "colour": 1}, "unknown key"),
    ],
)
def test_bad_limits_name_the_key_and_what_is_expected(item: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_config({"ratelimits": [item]}, source="proxy.yaml")
    text = err.value.render()
    assert "proxy.yaml" in text and "ratelimits.0" in text and message in text


def test_duplicate_names_store_and_exempt_errors() -> None:
    with pytest.raises(ConfigError, match="unique, repeated: a"):
        build_config({"ratelimits": [{"name": "a", "key": "client_ip", "rate": "1/hour"}] * 2})
    with pytest.raises(ConfigError, match="ratelimit_store: expected memory or a URL"):
        build_config({"ratelimit_store": "memcached://x"})
    with pytest.raises(ConfigError, match="ratelimit_exempt: expected CIDR"):
        build_config({"ratelimit_exempt": ["not-a-net"]})
    with pytest.raises(ConfigError, match="ratelimit_fail"):
        build_config({"ratelimit_fail": "maybe"})


@pytest.mark.parametrize(
    ("ip", "prefix"),
    [
        ("192.0.2.77", 24),
        ("192.0.2.77", 32),
        ("10.1.2.3", 8),
        ("0.0.0.0", 0),
        ("2001:db8:1:2:3::9", 64),
        ("2001:db8::1", 128),
        ("::1", 48),
    ],
)
def test_client_net_matches_ipaddress(ip: str, prefix: int) -> None:
    from smtpproxy.ratelimit.keys import client_net

    addr = ipaddress.ip_address(ip)
    assert client_net(addr, prefix) == str(ipaddress.ip_network(f"{ip}/{prefix}", strict=False))


@given(st.integers(min_value=0, max_value=2**32 - 1), st.booleans())
def test_client_network_from_the_address_text_equals_the_arithmetic(n: int, mapped: bool) -> None:
    ip4 = ipaddress.IPv4Address(n)
    ip = ipaddress.IPv6Address(f"::ffff:{ip4}") if mapped else ip4
    s = Session("S", ip, 1, "127.0.0.1", 25)
    assert build_key("l", KeySpec(("client_net",)), s) == f"l:{client_net(ip4, 24)}"
    assert build_key("l", KeySpec(("client_ip",)), s) == f"l:{ip4}"
