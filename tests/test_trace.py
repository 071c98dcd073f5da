"""``smtpproxy trace``: the story of a message from our JSON log lines, on real and generated logs.

The generated logs (tests/tracelog.py) are made of the real log code's lines,
with overlapping sessions and planted stories; the million-line one is written
to a temporary file and read the way an operator's would be, streamed.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import re
import sys
from pathlib import Path
from typing import Any

import pytest

from smtpproxy.cli import main
from smtpproxy.logs import flush_logs, setup_logging
from smtpproxy.trace import Query, find_stories, parse_time
from tests import tracelog
from tests.backends import RecordingBackend
from tests.smtpclient import RawClient, make_message


@pytest.fixture(scope="module")
def small_log(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30,000 lines: every filter checked on a log that takes no time to read."""
    path = tmp_path_factory.mktemp("trace") / "small.log"
    tracelog.write_log(path, 30_000)
    return path


def _trace(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["trace", *args])
    return code, capsys.readouterr().out


def _sessions(out: str) -> list[str]:
    return re.findall(r"^== session ([0-9A-F]+)", out, re.MULTILINE)


def test_million_line_log_planted_story_is_found_whole(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "big.log"
    sessions = tracelog.write_log(path, 1_000_000)
    with open(path, "rb") as f:
        assert sum(1 for _ in f) == 1_000_000
    code, out = _trace(capsys, str(path), "--queue-id", tracelog.TARGET_QUEUE_ID)
    assert code == 0
    assert _sessions(out) == [f"{0x5E0000000000 + tracelog.TARGET:012X}"]
    # connect, the transaction with every command's reply, rules, backend reply, disconnect; in order.
    story = [line.strip() for line in out.splitlines()]
    expected = [
        "connect from",
        f"transaction {0x7A0000000000 + tracelog.TARGET:012X}",
        "MAIL FROM:<sender1234@sender.example>  250 2.1.0",
        f"RCPT TO:<{tracelog.TARGET_RCPT}>  250 2.1.5",
        f"DATA  message-id {tracelog.TARGET_MESSAGE_ID}",
        "rules tag-newsletters",
        f"=> delivered at data (clean): 250 2.0.0 Ok: queued as {tracelog.TARGET_QUEUE_ID}",
        "disconnect",
    ]
    positions = [next(i for i, line in enumerate(story) if want in line) for want in expected]
    assert positions == sorted(positions), out
    # A time range over the whole log: the recipients of one mailbox in a window of 1,000 sessions.
    since, until = tracelog.session_ts(300_000), tracelog.session_ts(300_999)
    code, out = _trace(
        capsys, str(path), "--to", "USER7@example.org", "--since", str(since), "--until", str(until)
    )
    assert code == 0 and len(_sessions(out)) == 1 and sessions > 300_999


def test_each_filter_finds_its_stories(small_log: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = f"{0x5E0000000000 + tracelog.TARGET:012X}"
    for args in (
        ["--message-id", tracelog.TARGET_MESSAGE_ID.strip("<>")],
        ["--message-id", tracelog.TARGET_MESSAGE_ID],
        ["--txn", f"{0x7A0000000000 + tracelog.TARGET:012X}"],
        ["--to", tracelog.TARGET_RCPT.lower()],
        ["--session", target],
        ["--queue-id", tracelog.TARGET_QUEUE_ID, "--to", tracelog.TARGET_RCPT],
    ):
        code, out = _trace(capsys, str(small_log), *args)
        assert (code, _sessions(out)) == (0, [target]), args
    # Every filter must match: the right queue id with another recipient is nothing.
    code, out = _trace(
        capsys, str(small_log), "--queue-id", tracelog.TARGET_QUEUE_ID, "--to", "user1@example.org"
    )
    assert (code, out) == (1, "")


def test_sender_shows_only_the_matching_transaction_of_a_session(
    small_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _trace(capsys, str(small_log), "--from", tracelog.NEEDLE_SENDER.upper())
    assert code == 0 and len(_sessions(out)) == 1
    assert out.count("  transaction ") == 1 and "queued as NEEDLEQ1" in out


def test_client_ip_finds_its_sessions_and_time_range_narrows(
    small_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _trace(capsys, str(small_log), "--client-ip", tracelog.CLIENT_IP)
    assert code == 0 and len(_sessions(out)) == 1  # sessions 10 (20,000 and 300,000 are beyond this log)
    code, out = _trace(capsys, str(small_log), "--client-ip", "10.0.0.1")  # not 10.0.0.10 and up
    assert _sessions(out) == ["5E0000000001"]
    since = tracelog.session_ts(5_000)
    until = tracelog.session_ts(5_999)
    code, out = _trace(
        capsys, str(small_log), "--to", "user7@example.org", "--since", str(since), "--until", str(until)
    )
    assert len(_sessions(out)) == 1
    iso = "2026-11-30T00:00:00Z"
    assert parse_time(iso) < tracelog.T0 < parse_time("2026-11-30T01:00")


def test_json_output_is_the_log_lines_of_the_story(
    small_log: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = _trace(capsys, str(small_log), "--queue-id", tracelog.TARGET_QUEUE_ID, "--json")
    records = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [r["msg"] for r in records] == ["connect", "transaction", "disconnect"]
    assert records[1]["queue_id"] == tracelog.TARGET_QUEUE_ID


def test_bad_arguments_and_missing_file(
    small_log: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert main(["trace", str(small_log), "--since", "yesterday"]) == 2
    assert "--since" in capsys.readouterr().err
    assert main(["trace", str(tmp_path / "nope.log"), "--txn", "X"]) == 2
    assert "nope.log" in capsys.readouterr().err


async def test_story_of_a_real_proxy_session_from_stdin_with_foreign_lines(
    backend: RecordingBackend,
    start_proxy: Any,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = io.StringIO()
    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    setup_logging("json", "info", out)
    try:
        proxy = await start_proxy()
        async with RawClient(proxy.host, proxy.port) as c:
            await c.connect()
            assert (await c.cmd("EHLO client.test")).code == 250
            assert (await c.cmd("MAIL FROM:<s@sender.example>")).code == 250
            assert (await c.cmd("RCPT TO:<nobody@elsewhere.example>")).code == 550  # not ours to relay
            assert (
                await c.send_message("s@sender.example", ["user@example.org"], make_message("real"))
            ).code == 250
            assert (await c.cmd("QUIT")).code == 221
        await proxy.app.stop(grace=0.5)
        flush_logs()
    finally:
        root.handlers[:] = saved
        root.setLevel(level)
    received = backend.messages[-1].content.decode()
    txn = re.search(r"\(smtpproxy\) with ESMTP id ([0-9A-F]+)", received)
    assert txn is not None
    # A journal also holds lines that are not ours to read: tracebacks, text.
    text = "Traceback (most recent call last):\nnot json {\n" + out.getvalue() + "[]\n"
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode())))
    code, story = _trace(capsys, "--txn", txn.group(1))
    assert code == 0 and len(_sessions(story)) == 1, story
    assert "connect from 127.0.0.1" in story and "disconnect" in story
    assert "RCPT TO:<user@example.org>  250 2.1.5" in story
    assert "[backend queue id Q1]" in story
    # The session's earlier transaction (the refused relay) is a story of its own query.
    lines = io.BytesIO(out.getvalue().encode())
    stories = list(find_stories(lines, Query(rcpt="nobody@elsewhere.example")))
    assert len(stories) == 1 and stories[0].transactions[0]["rcpts"][0]["reply"].startswith("550")


def test_rotated_gzip_logs_are_read_in_order(
    small_log: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rotated = tmp_path / "smtpproxy.log.1.gz"
    with gzip.open(rotated, "wb") as f:
        f.write(small_log.read_bytes())
    code, out = _trace(capsys, str(rotated), str(small_log), "--queue-id", tracelog.TARGET_QUEUE_ID)
    assert code == 0 and len(_sessions(out)) == 2  # once per file
