#!/usr/bin/env python3
"""Cost of the rules: 20 KB multipart messages, shipped rules + 200 generated regex rules.

    .venv/bin/python bench/rules_bench.py [--messages 400] [--rounds 3] [--sessions 4]

1. In-process: median time of RulesCheck over mail, rcpt and data for one
   message (fresh transaction each time, so MIME parsing is included).
2. End to end: messages/second through an in-process proxy (real sockets on
   loopback, recording backend) with no rules, then with the rules; prints
   the ratio (target >= 0.6).
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import shutil
import statistics
import sys
import tempfile
import time
from email.message import EmailMessage
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from smtpproxy.app import App  # noqa: E402
from smtpproxy.config import build_config  # noqa: E402
from smtpproxy.metrics import Metrics  # noqa: E402
from smtpproxy.rules import RulesEngine  # noqa: E402
from smtpproxy.session import Recipient, Session, Transaction  # noqa: E402
from tests.backends import RecordingBackend  # noqa: E402
from tests.smtpclient import RawClient, dot_stuff  # noqa: E402


def message_20k() -> bytes:
    """A realistic 20 KB multipart/mixed: text, HTML alternative with links, a PDF attachment."""
    words = [
        "lorem",
        "ipsum",
        "dolor",
        "sit",
        "amet",
        "consectetur",
        "adipiscing",
        "elit",
        "sed",
        "do",
        "eiusmod",
        "tempor",
    ]
    text = "\n".join(" ".join(words[(i + j) % len(words)] for j in range(12)) for i in range(85))
    html = "".join(
        f"<p>{' '.join(words[(i + j) % len(words)] for j in range(10))} "
        f"<a href='https://shop{i % 7}.example.com/item/{i}'>item {i}</a></p>"
        for i in range(80)
    )
    m = EmailMessage()
    m["From"] = "Shop News <news@shop.example.com>"
    m["To"] = "user@example.org"
    m["Subject"] = "Your weekly selection of offers"
    m["Date"] = "Mon, 03 Jun 2024 10:00:00 +0000"
    m["Message-ID"] = "<bench-1@shop.example.com>"
    m["X-Mailer"] = "BenchMailer 1.0"
    m.set_content(text)
    m.add_alternative(f"<html><body>{html}</body></html>", subtype="html")
    m.add_attachment(
        b"%PDF-1.4\n" + b"0" * 3000, maintype="application", subtype="pdf", filename="catalog.pdf"
    )
    return m.as_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")


def generated_rules(count: int = 200) -> str:
    """Header and body regex rules that do not match the bench message (the common case)."""
    out = []
    for i in range(count):
        if i % 2:
            field, pattern = "body", rf"\b(?:cheap|free|discount)\s+promo{i}[a-z]{{2,8}}\b"
        else:
            field = ("subject", "header.x-mailer", "from.name", "header.to")[i % 4]
            pattern = rf"^(?:re:\s*)?win{i}\s+(?:big|now)"
        out.append(f"- name: gen_{i}\n  if: {{{field}: {{regex: '{pattern}'}}}}\n  then: {{score: 0.5}}\n")
    return "".join(out)


def make_rules_dir(base: Path) -> Path:
    folder = base / "rules"
    shutil.copytree(ROOT / "smtpproxy" / "data" / "rules", folder)
    (folder / "90-generated.yaml").write_text(generated_rules())
    return folder


async def evaluation_time(folder: Path, message: bytes, n: int) -> tuple[float, int]:
    engine = RulesEngine(folder, Metrics(process=False))
    engine.load()
    check = engine.check
    times = []
    for _ in range(n):
        session = Session(
            "S", ipaddress.ip_address("192.0.2.10"), 4000, "127.0.0.1", 25, helo="mx.example.net"
        )
        txn = Transaction("T", "news@shop.example.com")
        started = time.perf_counter()
        await check.connect(session)
        await check.helo(session)
        await check.mail(session, txn)
        await check.rcpt(session, txn, Recipient("user@example.org"))
        txn.recipients.append(Recipient("user@example.org"))
        txn.message = message
        await check.data(session, txn)
        times.append(time.perf_counter() - started)
    return statistics.median(times), len(engine.current)


async def throughput(rules: Path, message: bytes, messages: int, sessions: int, base: Path) -> float:
    backend = RecordingBackend()
    await backend.start()
    config = build_config(
        {
            "listen": "127.0.0.1:0",
            "hostname": "mx.bench.example",
            "backend": f"smtp://127.0.0.1:{backend.port}",
            "metrics": None,
            "relay_domains": ["example.org"],
            "dns": {"reverse_lookup": False, "nameservers": ["127.0.0.1:9"], "timeout": 0.2},
            "backend_options": {"tls_verify": False},
            "log": {"level": "error"},
            "rules": str(rules),
            "rules_options": {"reload_interval": 0},
            "spf": {"enabled": False},
            "dkim": {"enabled": False},
            "arc": {"enabled": False},
            "dmarc": {"enabled": False},
        },
        base_dir=base,
    )
    app = App(config)
    await app.start()
    host, port = app.listen_port_address
    payload = dot_stuff(message) + b"."
    per_session = messages // sessions

    async def worker() -> None:
        async with RawClient(host, port) as c:
            await c.connect()
            await c.cmd("EHLO bench.example")
            for _ in range(per_session):
                await c.cmd("MAIL FROM:<news@shop.example.com>")
                await c.cmd("RCPT TO:<user@example.org>")
                await c.cmd("DATA")
                reply = await c.cmd(payload)
                assert reply.code == 250, reply
            await c.cmd("QUIT")

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(sessions)))
    elapsed = time.perf_counter() - started
    await app.stop(grace=0.5)
    await backend.stop()
    return per_session * sessions / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sessions", type=int, default=4)
    args = parser.parse_args()
    message = message_20k()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp)
        rules = make_rules_dir(base)
        empty = base / "no-rules"
        empty.mkdir()
        median, loaded = await evaluation_time(rules, message, 500)
        shipped, _ = await evaluation_time(ROOT / "smtpproxy" / "data" / "rules", message, 500)
        print(f"message size: {len(message)} bytes; rules loaded: {loaded}")
        print(
            f"median rules evaluation per message: {median * 1e3:.3f} ms (shipped rules only: {shipped * 1e3:.3f} ms)"
        )
        off, on = [], []
        for _ in range(args.rounds):
            off.append(await throughput(empty, message, args.messages, args.sessions, base))
            on.append(await throughput(rules, message, args.messages, args.sessions, base))
        m_off, m_on = statistics.median(off), statistics.median(on)
        print(
            f"throughput rules off: {m_off:.0f} msg/s, rules on: {m_on:.0f} msg/s, ratio {m_on / m_off:.2f}"
        )


if __name__ == "__main__":
    asyncio.run(main())
