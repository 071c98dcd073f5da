"""Session facts: the client address text, ids."""

from __future__ import annotations

import ipaddress

from smtpproxy.session import Session, new_id


def test_client_address_follows_a_proxy_header_rewrite() -> None:
    s = Session("S", ipaddress.ip_address("192.0.2.1"), 1, "127.0.0.1", 25)
    assert s.client_address == "192.0.2.1"
    assert s.client_address == "192.0.2.1"  # from the cache
    s.client_ip = ipaddress.ip_address("2001:db8::1")  # what a PROXY header does
    assert s.client_address == "2001:db8::1"
    s.client_ip = ipaddress.ip_address("::ffff:198.51.100.7")
    assert s.client_address == str(ipaddress.ip_address("::ffff:198.51.100.7"))


def test_ids_are_twelve_hex_digits_and_do_not_repeat() -> None:
    ids = {new_id() for _ in range(10_000)}
    assert len(ids) == 10_000
    assert all(len(i) == 12 and int(i, 16) >= 0 and i == i.upper() for i in ids)
