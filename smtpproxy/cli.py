"""Command line: ``smtpproxy serve | check | rules check | rules test``.

Exit codes: 0 success, 1 a test or check failed, 2 the configuration or rules
are invalid (the message names the file, key or line).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

from smtpproxy import __version__
from smtpproxy.config import Config, ConfigError, load_config
from smtpproxy.logs import setup_logging

log = logging.getLogger("smtpproxy")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG = 0, 1, 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smtpproxy", description="Inbound SMTP filtering proxy.")
    parser.add_argument("--version", action="version", version=f"smtpproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the proxy")
    serve.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")

    cfg = sub.add_parser("config", help="validate a config file and print the effective settings")
    cfg.add_argument("--config", "-c", help="YAML config file (default: embedded defaults)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``smtpproxy`` console script."""
    args = _parser().parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as err:
        print(err.render(), file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "config":
        print(config.model_dump_json(indent=2, exclude={"base_dir"}))
        return EXIT_OK
    return serve(config)


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT, then drain and exit 0."""
    setup_logging(config.log.format, config.log.level)
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


async def _serve(config: Config) -> int:
    from smtpproxy.app import App

    app = App(config)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    with contextlib.suppress(NotImplementedError, AttributeError):
        loop.add_signal_handler(signal.SIGHUP, app.reload)
    await stop.wait()
    log.info("shutting down", extra={"fields": {"grace": config.shutdown_grace}})
    await app.stop()
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
