"""Log formats: one JSON object per line by default, key=value text when asked; batched writes."""

from __future__ import annotations

import io
import json
import logging

from smtpproxy.logs import EventLog, flush_logs, setup_logging


def _reset() -> None:
    logging.getLogger().handlers[:] = []


def test_json_lines_carry_the_fields() -> None:
    out = io.StringIO()
    setup_logging("json", "info", out)
    try:
        EventLog()._emit(
            logging.getLogger("smtpproxy.transaction"), "transaction", {"action": "delivered", "n": 1}
        )
        logging.getLogger("smtpproxy.app").warning("careful")
        flush_logs()
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        assert (
            lines[0]["msg"] == "transaction"
            and lines[0]["action"] == "delivered"
            and lines[0]["level"] == "info"
        )
        assert lines[1]["msg"] == "careful" and lines[1]["level"] == "warning"
    finally:
        _reset()


def test_text_format_and_level_filter() -> None:
    out = io.StringIO()
    setup_logging("text", "warning", out)
    try:
        log = EventLog()
        log._emit(logging.getLogger("smtpproxy.transaction"), "transaction", {"action": "delivered"})
        logging.getLogger("smtpproxy.app").error("broken %s", "thing")
        flush_logs()
        text = out.getvalue()
        assert "transaction" not in text  # info is below the configured level
        assert " error smtpproxy.app: broken thing" in text
    finally:
        _reset()


def test_warnings_are_written_at_once_info_is_batched() -> None:
    out = io.StringIO()
    setup_logging("json", "info", out)
    try:
        logging.getLogger("smtpproxy.app").info("later")
        assert out.getvalue() == ""
        logging.getLogger("smtpproxy.app").warning("now")
        assert "later" in out.getvalue() and "now" in out.getvalue()
    finally:
        _reset()
