"""``smtpproxy quarantine list | show ID | release ID | delete ID`` over a maildir quarantine.

The folder is ``--folder PATH`` (a rule's own ``quarantine: {to: maildir:PATH}``)
or else the config's ``scores.quarantine_to`` when it is a ``maildir:``.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from smtpproxy.config import Config
from smtpproxy.logs import setup_logging
from smtpproxy.quarantine import QuarantineError, QuarantineFolder, release

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``quarantine`` subcommands."""
    quarantine = sub.add_parser("quarantine", help="list, show, release or delete quarantined messages")
    quarantine.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
    quarantine.add_argument(
        "--folder", help="the quarantine maildir (default: the config's scores.quarantine_to)"
    )
    q_sub = quarantine.add_subparsers(dest="quarantine_command", required=True)
    q_sub.add_parser("list", help="one line per quarantined message: ID, date, sender, recipients, rules")
    for name, text in (
        ("show", "the envelope, the rules that matched and the headers of one message"),
        ("release", "deliver one message to the backend, then remove it from the quarantine"),
        ("delete", "remove one message from the quarantine"),
    ):
        p = q_sub.add_parser(name, help=text)
        p.add_argument("id", help="the message ID, as `smtpproxy quarantine list` shows")
        if name == "release":
            p.add_argument("--keep", action="store_true", help="keep the quarantined copy after release")


def _folder(config: Config, args: argparse.Namespace) -> Path | None:
    if args.folder:
        return Path(args.folder)
    target = config.scores.quarantine_to
    if target is not None and target.startswith("maildir:"):
        return config.path(target[len("maildir:") :])
    return None


def run(config: Config, args: argparse.Namespace) -> int:
    """Run one quarantine subcommand; exit 0 done, 1 failed (no such message, backend refused), 2 no folder."""
    root = _folder(config, args)
    if root is None:
        print(
            "error: no quarantine folder: scores.quarantine_to is not a maildir:PATH; pass --folder PATH",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    folder = QuarantineFolder(root)
    setup_logging(config.log.format, config.log.level)
    try:
        command = args.quarantine_command
        if command == "list":
            for item in folder.list():
                rcpts = ",".join(item.recipients) or "?"
                rules = ",".join(item.rules) or item.reason or "?"
                print(f"{item.id}\t{item.date}\t<{item.sender}>\t{rcpts}\t{rules}\t{item.subject}")
            return EXIT_OK
        if command == "show":
            item = folder.show(args.id)
            print(f"id: {item.id}\nfile: {item.path}\nfrom: <{item.sender}>")
            print(f"to: {', '.join(f'<{r}>' for r in item.recipients)}")
            print(f"quarantined by: {item.reason or '?'}\nrules matched: {', '.join(item.rules) or 'none'}")
            print(
                f"score: {item.score or '?'}\nsubject: {item.subject}\ndate: {item.date}\nsize: {item.size}"
            )
            return EXIT_OK
        if command == "delete":
            folder.delete(args.id)
            print(f"deleted {args.id}")
            return EXIT_OK
        reply = asyncio.run(release(config, folder, args.id, keep=args.keep))
    except QuarantineError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    if not reply.is_positive:
        print(f"error: the backend refused {args.id}: {reply}; it stays in quarantine", file=sys.stderr)
        return EXIT_FAILED
    print(f"released {args.id}: {reply}")
    return EXIT_OK
