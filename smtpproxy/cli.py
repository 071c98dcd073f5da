"""Command line: ``smtpproxy serve | config | check | init | rules check|test|path | quarantine ... | trace | dkim keygen``.

Exit codes: 0 success, 1 a test or check failed, 2 the configuration or rules
are invalid (the message names the file, key or line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from smtpproxy.config import Config, ConfigError, load_config, resolved_settings
from smtpproxy.logs import setup_logging

log = logging.getLogger("smtpproxy")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


class _Version(argparse.Action):
    """``--version``: argparse's own action would re-wrap the one-library-per-line text."""

    def __init__(self, option_strings: list[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *args: object, **kwargs: object) -> None:
        from smtpproxy.versions import version_text

        print(version_text())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    """The argparse definitions: the CLI, and the source of the man page and the bash completion."""
    from smtpproxy.quarantinecmd import add_parser as add_quarantine
    from smtpproxy.submission.keygencmd import add_parser as add_dkim

    parser = argparse.ArgumentParser(prog="smtpproxy", description="Inbound SMTP filtering proxy.")
    parser.add_argument(
        "--version", action=_Version, help="print our version and the mail libraries', then exit"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")

    cfg = sub.add_parser(
        "config", help="validate a config file and print the effective settings, paths resolved"
    )
    cfg.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")

    check = sub.add_parser("check", help="evaluate one message through the pipeline (no backend); print JSON")
    check.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
    check.add_argument("--client-ip", default="127.0.0.1", help="the connecting client's address")
    check.add_argument("--helo", default="localhost", help="the HELO/EHLO name")
    check.add_argument("--mail-from", default="", help="the MAIL FROM address ('' for <>)")
    check.add_argument("--rcpt", action="append", default=[], help="a RCPT TO address (repeatable)")
    check.add_argument("message", help="the message file (.eml)")

    init = sub.add_parser(
        "init", help="write a commented smtpproxy.yaml, a rules/ folder and a systemd drop-in"
    )
    init.add_argument("dir", help="the folder to write into (e.g. /etc/smtpproxy); nothing is overwritten")

    rules = sub.add_parser("rules", help="validate or test rule files, or say where they are")
    rules_sub = rules.add_subparsers(dest="rules_command", required=True)
    for name, text in (
        ("check", "validate rule files and lists"),
        ("test", "run the rule files' inline tests"),
    ):
        p = rules_sub.add_parser(name, help=text)
        p.add_argument("dir", nargs="?", help="rules folder (default: the config's `rules`)")
        p.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
    path = rules_sub.add_parser("path", help="print the rules folder in use (the packaged one by default)")
    path.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
    add_quarantine(sub)
    _add_trace(sub)
    add_dkim(sub)
    return parser


def _add_trace(sub: Any) -> None:
    trace = sub.add_parser(
        "trace",
        help="print the story of matching messages from JSON log lines",
        description="Reads our JSON log lines (files, or stdin: journalctl -o cat -u smtpproxy | smtpproxy "
        "trace --to user@example.org) and prints each matching session: connect, each transaction's "
        "commands and replies, rules, results, the backend's reply and queue id, disconnect. "
        "Every given filter must match. Exit 0 when something was found, 1 when not.",
    )
    trace.add_argument("logs", nargs="*", help="log files (default, or '-': stdin)")
    trace.add_argument("--message-id", help="the Message-ID header (with or without <>)")
    trace.add_argument("--txn", help="our transaction id (the 'id' of our Received field)")
    trace.add_argument("--queue-id", help="the backend's queue id (from its 250 reply)")
    trace.add_argument("--session", help="our session (connection) id")
    trace.add_argument("--from", dest="sender", help="the envelope sender (MAIL FROM)")
    trace.add_argument("--to", dest="rcpt", help="an envelope recipient (RCPT TO)")
    trace.add_argument("--client-ip", help="the client's address")
    trace.add_argument("--since", help="from this time on (epoch seconds or ISO 8601, UTC unless given)")
    trace.add_argument("--until", help="up to this time (same forms)")
    trace.add_argument("--json", action="store_true", help="print the matching log lines instead of text")


def _trace(args: argparse.Namespace) -> int:
    from smtpproxy.trace import Query, parse_time, run

    try:
        since = parse_time(args.since) if args.since else None
        until = parse_time(args.until) if args.until else None
    except ValueError as err:
        print(f"error: --since/--until: {err}", file=sys.stderr)
        return EXIT_CONFIG
    query = Query(
        args.message_id,
        args.txn,
        args.queue_id,
        args.session,
        args.sender,
        args.rcpt,
        args.client_ip,
        since,
        until,
    )
    try:
        found = run(args.logs, query, as_json=args.json)
    except OSError as err:
        print(f"error: {err.filename}: {err.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    return EXIT_OK if found else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smtpproxy`` console script."""
    args = build_parser().parse_args(argv)
    if args.command == "init":
        return _init(Path(args.dir))
    if args.command == "trace":  # reads logs, needs no configuration
        return _trace(args)
    if args.command == "dkim":
        from smtpproxy.submission.keygencmd import run as run_dkim

        return run_dkim(args)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "config":
        print(json.dumps(resolved_settings(config), indent=2))
        return EXIT_OK
    if args.command == "quarantine":
        from smtpproxy.quarantinecmd import run as run_quarantine

        return run_quarantine(config, args)
    if args.command == "rules" and args.rules_command == "path":
        print(config.rules_path if config.rules_path is not None else "none (rules: null)")
        return EXIT_OK
    if args.command == "rules":
        from smtpproxy.rules.cli import cmd_rules_check, cmd_rules_test

        folder = Path(args.dir) if args.dir else config.rules_path
        if folder is None:
            print(f"ok: no rules (rules: null in {args.config or 'the embedded defaults'})")
            return EXIT_OK
        if not folder.is_dir():
            # Checking nothing and saying "ok: 0 rules" would hide a typo.
            print(f"error: rules folder {folder}: no such folder", file=sys.stderr)
            return EXIT_CONFIG
        command = cmd_rules_check if args.rules_command == "check" else cmd_rules_test
        return command(folder, config)
    if args.command == "check":
        return _check(config, args)
    return serve(config, args.config)


def _init(folder: Path) -> int:
    from smtpproxy.initcmd import InitError, init

    try:
        written = init(folder)
    except InitError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _check(config: Config, args: argparse.Namespace) -> int:
    from smtpproxy.checkcmd import render, run_check
    from smtpproxy.rules.loader import RulesError

    path = Path(args.message)
    if not path.is_file():
        print(f"error: {path}: no such message file", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging("text", "warning")
    try:
        result = asyncio.run(
            run_check(
                config,
                path.read_bytes(),
                client_ip=args.client_ip,
                helo=args.helo,
                mail_from=args.mail_from,
                rcpts=args.rcpt or None,
            )
        )
    except RulesError as err:
        print(f"error: invalid rules in {config.rules_path}:\n{err.render()}", file=sys.stderr)
        return EXIT_CONFIG
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_CONFIG
    print(render(result))
    return EXIT_OK


def serve(config: Config, config_path: str | None = None) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0 (with ``workers: N``, supervise N processes)."""
    from smtpproxy.workers import Supervisor, is_worker

    setup_logging(config.log.format, config.log.level)
    if config.workers > 1 and not is_worker():
        return int(asyncio.run(Supervisor(config, config_path).run()))
    try:
        import uvloop

        return int(uvloop.run(_serve(config)))
    except ImportError:  # uvloop is optional (not on Windows)
        pass
    except OSError as err:
        print(f"error: cannot start: {err}", file=sys.stderr)
        return EXIT_FAILED
    try:
        return int(asyncio.run(_serve(config)))
    except OSError as err:
        print(f"error: cannot start: {err}", file=sys.stderr)
        return EXIT_FAILED


def tune_gc() -> None:
    """Collector settings for a long-running server (about 4% more messages/s, measured).

    What exists after startup (configuration, rules, the public suffix list,
    imported libraries) lives as long as the process: frozen, full collections
    no longer walk it. A first threshold of 7,000 instead of 700 collects once
    per few sessions rather than several times per message.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(7000, 10, 10)


async def _serve(config: Config) -> int:
    from smtpproxy.app import App
    from smtpproxy.rules.loader import RulesError
    from smtpproxy.submission.build import SubmissionSetupError
    from smtpproxy.submission.dkimsign import SignerError
    from smtpproxy.submission.passwd import PasswdError
    from smtpproxy.submission.senderlogin import SenderLoginError
    from smtpproxy.workers import is_worker

    try:
        app = App(config, worker=is_worker())
    except RulesError as err:
        print(f"error: invalid rules in {config.rules_path}:\n{err.render()}", file=sys.stderr)
        return EXIT_CONFIG
    except (SignerError, PasswdError, SenderLoginError, SubmissionSetupError) as err:
        # passwd_file, sender_login or a DKIM key: the message names the file (never its content).
        print(f"error: invalid submission setup: {err}", file=sys.stderr)
        return EXIT_CONFIG
    # Handlers before the start: a SIGTERM while binding (right after the
    # "listening" line, say) still drains and exits 0 instead of killing us.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await app.start()
    tune_gc()
    with contextlib.suppress(NotImplementedError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, app.reload)
    await stop.wait()
    log.info("shutting down", extra={"fields": {"grace": config.shutdown_grace}})
    await app.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
