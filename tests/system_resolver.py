"""Run the smtpproxy CLI with a test DNS server standing in for the machine's resolver.

``python -m tests.system_resolver 127.0.0.1:PORT serve`` is ``smtpproxy serve``,
except that "the nameservers of /etc/resolv.conf" (what a config without
``dns.nameservers``, like the embedded defaults, uses) are ``127.0.0.1:PORT``.
A test of the embedded defaults must not depend on this machine's DNS; this
replaces the reading of resolv.conf and nothing else.
"""

from __future__ import annotations

import sys

import smtpproxy.dns
from smtpproxy.addresses import parse_hostport
from smtpproxy.cli import main


def run(argv: list[str]) -> int:
    """``argv``: the nameserver as host:port, then the smtpproxy arguments."""
    server = parse_hostport(argv[0])
    smtpproxy.dns._system_nameservers = lambda: [(server.host, server.port)]
    return main(argv[1:])


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
