#!/usr/bin/env python3
"""Speed of ``smtpproxy trace`` on a generated JSON log (tests/tracelog.py: real line format).

    .venv/bin/python bench/trace_bench.py [--lines 1000000]

Writes the log to a temporary file, then times one streamed pass per query
(the file is in the page cache after writing: this measures our parsing, not
the disk). Prints seconds, lines/s and MB/s per query.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpproxy.trace import Query, run  # noqa: E402
from tests import tracelog  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=1_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "smtpproxy.log"
        started = time.perf_counter()
        tracelog.write_log(path, args.lines)
        size = path.stat().st_size
        print(f"generated {args.lines:,} lines, {size / 1e6:.0f} MB in {time.perf_counter() - started:.1f} s")
        queries = {
            "queue id": Query(queue_id=tracelog.TARGET_QUEUE_ID),
            "recipient (case-insensitive)": Query(rcpt=tracelog.TARGET_RCPT.lower()),
            "client ip": Query(client_ip=tracelog.CLIENT_IP),
            "recipient + time range": Query(
                rcpt="user7@example.org", since=tracelog.session_ts(1000), until=tracelog.session_ts(2000)
            ),
        }
        for name, query in queries.items():
            started = time.perf_counter()
            found = run([str(path)], query, out=io.StringIO())
            took = time.perf_counter() - started
            print(
                f"{name:30s} {found:3d} stories  {took:5.2f} s  {args.lines / took / 1e6:4.2f} M lines/s"
                f"  {size / took / 1e6:4.0f} MB/s"
            )


if __name__ == "__main__":
    main()
