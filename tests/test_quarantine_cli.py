"""``smtpproxy quarantine list|show|release|delete`` over a maildir the running proxy quarantined into."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

from tests.backends import RecordingBackend
from tests.procs import ROOT
from tests.smtpclient import RawClient, make_message
from tests.test_rules_proxy import QUIET

RCPTS = ["user@example.org", "other@example.org"]


def write_rules(folder: Path, quarantine: Path) -> None:
    folder.mkdir()
    (folder / "10-q.yaml").write_text(
        "- name: suspicious_subject\n  stage: data\n  if: {subject: {contains: QUARANTINE}}\n"
        "  then: {score: 1.0}\n"
        "- name: hold_for_review\n  stage: data\n  if: {subject: {contains: QUARANTINE-ME}}\n"
        f"  then: {{quarantine: {{to: 'maildir:{quarantine}'}}}}\n"
    )


async def cli(*args: str) -> tuple[int, str, str]:
    """The CLI in a child process, awaited (the backend of this loop keeps answering)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "smtpproxy",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def quarantine_one(proxy: Any, subject: str) -> None:
    async with RawClient(proxy.host, proxy.port) as c:
        assert (await c.connect()).code == 220
        reply = await c.send_message("sender@sender.example", RCPTS, make_message(subject=subject))
        assert reply.code == 250, reply


def config_file(tmp_path: Path, backend: RecordingBackend, quarantine: Path) -> Path:
    cfg = tmp_path / "cli.yaml"
    cfg.write_text(
        f"backend: smtp://127.0.0.1:{backend.port}\nrules: null\nlog: {{level: warning}}\n"
        f"backend_options: {{tls_verify: false}}\nscores: {{quarantine_to: 'maildir:{quarantine}'}}\n"
    )
    return cfg


async def test_list_show_release_delete(tmp_path: Path, backend: RecordingBackend, start_proxy) -> None:
    quarantine = tmp_path / "quarantine"
    write_rules(tmp_path / "rules", quarantine)
    proxy = await start_proxy({**QUIET, "rules": str(tmp_path / "rules")})
    await quarantine_one(proxy, "QUARANTINE-ME please")
    assert backend.messages == []
    cfg = config_file(tmp_path, backend, quarantine)

    code, out, err = await cli("quarantine", "--config", str(cfg), "list")
    assert code == 0, err
    (line,) = out.splitlines()
    ident, _date, sender, rcpts, rules, subject = line.split("\t")
    assert (sender, rcpts, rules, subject) == (
        "<sender@sender.example>",
        ",".join(RCPTS),
        "suspicious_subject,hold_for_review",
        "QUARANTINE-ME please",
    )
    code, out, err = await cli("quarantine", "--config", str(cfg), "show", ident)
    assert code == 0, err
    assert "quarantined by: hold_for_review\n" in out
    assert "rules matched: suspicious_subject, hold_for_review\n" in out
    assert "to: <user@example.org>, <other@example.org>\n" in out

    # Bad IDs: a clear error, exit 1, and the quarantine still works for the next command.
    for bad, says in (("../../etc", "expected a quarantine ID"), ("NOPE", "no quarantined message NOPE")):
        code, _, err = await cli("quarantine", "--config", str(cfg), "show", bad)
        assert code == 1 and says in err, err

    code, out, err = await cli("quarantine", "--config", str(cfg), "release", ident)
    assert code == 0, err
    assert out.startswith(f"released {ident}: 250 ")
    (released,) = backend.messages
    assert released.mail_from == "sender@sender.example" and released.rcpts == RCPTS
    assert b"X-Smtpproxy-" not in released.content and b"Return-Path:" not in released.content
    assert b"Subject: QUARANTINE-ME please" in released.content
    assert (await cli("quarantine", "--config", str(cfg), "list"))[1] == ""

    await quarantine_one(proxy, "QUARANTINE-ME again")
    ident = (await cli("quarantine", "--config", str(cfg), "list"))[1].split("\t")[0]
    code, out, err = await cli("quarantine", "--folder", str(quarantine), "delete", ident)
    assert (code, out) == (0, f"deleted {ident}\n"), err
    assert not list((quarantine / "new").iterdir())
    assert len(backend.messages) == 1


async def test_release_refused_by_the_backend_keeps_the_message(
    tmp_path: Path, backend: RecordingBackend, start_proxy
) -> None:
    quarantine = tmp_path / "quarantine"
    write_rules(tmp_path / "rules", quarantine)
    proxy = await start_proxy({**QUIET, "rules": str(tmp_path / "rules")})
    await quarantine_one(proxy, "QUARANTINE-ME please")
    cfg = config_file(tmp_path, backend, quarantine)
    ident = (await cli("quarantine", "--config", str(cfg), "list"))[1].split("\t")[0]
    backend.rcpt_replies["other@example.org"] = "550 5.1.1 No such user"
    code, _, err = await cli("quarantine", "--config", str(cfg), "release", ident)
    assert code == 1
    assert f"error: the backend refused {ident}: 550 5.1.1" in err and "stays in quarantine" in err
    assert backend.messages == []
    assert len(list((quarantine / "new").iterdir())) == 1


async def test_no_quarantine_folder_is_a_config_error(tmp_path: Path) -> None:
    cfg = tmp_path / "cli.yaml"
    cfg.write_text("rules: null\n")
    code, _, err = await cli("quarantine", "--config", str(cfg), "list")
    assert code == 2
    assert "scores.quarantine_to is not a maildir:PATH; pass --folder PATH" in err


async def test_delivered_marked_mail_does_not_carry_the_envelope(
    tmp_path: Path, backend: RecordingBackend, start_proxy
) -> None:
    """Without a quarantine destination the message is delivered marked: Bcc recipients stay private."""
    folder = tmp_path / "rules"
    folder.mkdir()
    (folder / "10-q.yaml").write_text(
        "- name: hold\n  stage: data\n  if: {subject: {contains: QUARANTINE-ME}}\n  then: quarantine\n"
    )
    proxy = await start_proxy({**QUIET, "rules": str(folder)})
    await quarantine_one(proxy, "QUARANTINE-ME please")
    (delivered,) = backend.messages
    assert b"X-Smtpproxy-Quarantine: hold\r\n" in delivered.content
    assert b"X-Smtpproxy-Envelope-To" not in delivered.content
