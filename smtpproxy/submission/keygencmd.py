"""``smtpproxy dkim keygen DOMAIN SELECTOR``: write a signing key, print its DNS record and config entry."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from smtpproxy.config.submission import valid_domain, valid_selector
from smtpproxy.submission.dkimkeys import generate

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``dkim`` subcommands."""
    dkim = sub.add_parser("dkim", help="outbound DKIM signing keys")
    d_sub = dkim.add_subparsers(dest="dkim_command", required=True)
    keygen = d_sub.add_parser(
        "keygen", help="write a new signing key (PEM, mode 0600) and print the DNS TXT record to publish"
    )
    keygen.add_argument("domain", help="the signing domain (d=), e.g. example.org")
    keygen.add_argument("selector", help="the selector (s=), e.g. s2026r")
    keygen.add_argument("--type", choices=("rsa", "ed25519"), default="rsa", help="key type (default: rsa)")
    keygen.add_argument("--bits", type=int, default=2048, help="RSA key size (default: 2048)")
    keygen.add_argument(
        "--out", help="the key file to write (default: DOMAIN.SELECTOR.key in the current folder)"
    )


def dns_record(domain: str, selector: str, txt: str) -> str:
    """The record in zone-file syntax, split into the 255-byte strings a TXT record holds."""
    parts = " ".join(f'"{txt[i : i + 255]}"' for i in range(0, len(txt), 255))
    return f"{selector}._domainkey.{domain}. IN TXT ( {parts} )"


def run(args: argparse.Namespace) -> int:
    """Write the key (never over an existing file) and print the record; 0 done, 1 not written, 2 bad input."""
    try:
        domain, selector = valid_domain(args.domain), valid_selector(args.selector)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if args.type == "rsa" and not 1024 <= args.bits <= 8192:
        print(f"error: --bits: expected 1024..8192 (2048 recommended), got {args.bits}", file=sys.stderr)
        return EXIT_USAGE
    path = Path(args.out or f"{domain}.{selector}.key")
    pem, txt = generate(args.type, args.bits)
    try:
        # O_EXCL: never replace a key whose record may be published; 0600 from the first byte.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        print(f"error: {path}: exists, not overwritten (choose a new selector to rotate)", file=sys.stderr)
        return EXIT_FAILED
    except OSError as err:
        print(f"error: {path}: cannot write: {err.strerror}", file=sys.stderr)
        return EXIT_FAILED
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    print(f"wrote {path}", file=sys.stderr)
    print("# publish in DNS:")
    print(dns_record(domain, selector, txt))
    print("# and add to smtpproxy.yaml:")
    print(f"# dkim_sign:\n#   - {{domain: {domain}, selector: {selector}, key: {path.resolve()}}}")
    return EXIT_OK
