"""A witness we did not write: nmap's smtp-open-relay script against the running proxy.

The backend here accepts every recipient, so only the proxy stands between the
script's sixteen relay tricks (percent hack, quoted and bang paths, source
routes, address literals) and a relay. ``relay_domains`` holds the proxy's
own host name, as the percent hack needs a relayed domain on the right.
"""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from tests.backends import RecordingBackend

pytestmark = pytest.mark.skipif(
    shutil.which("nmap") is None, reason="nmap is not installed (.ci/run installs it)"
)

QUIET = {name: {"enabled": False} for name in ("spf", "dkim", "arc", "dmarc")}


def nmap_data_dir(folder: Path, port: int) -> Path:
    """An nmap data folder naming ``port`` smtp, so the script's port rule runs without -sV (24 s)."""
    folder.mkdir(exist_ok=True)
    (folder / "nmap-services").write_text(f"smtp\t{port}/tcp\t0.5\n")
    return folder


async def smtp_open_relay(port: int, data_dir: Path) -> str:
    """nmap's verdict line for 127.0.0.1:port, relaying to elsewhere.example."""
    proc = await asyncio.create_subprocess_exec(
        "nmap",
        "-n",
        "-Pn",
        "-p",
        str(port),
        "--datadir",
        str(data_dir),
        "--script",
        "smtp-open-relay",
        "--script-args",
        "smtp-open-relay.domain=elsewhere.example,smtp-open-relay.ip=127.0.0.1",
        "127.0.0.1",
        stdout=asyncio.subprocess.PIPE,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode()
    assert "smtp-open-relay:" in text, text
    return text


def write_trusting_rule(folder: Path) -> None:
    folder.mkdir(exist_ok=True)
    (folder / "00-allow.yaml").write_text(
        "rules:\n  - name: allow_loopback\n    stage: connect\n"
        "    if: {client.ip: {cidr: [127.0.0.0/8]}}\n    then: accept\n"
    )


@pytest.mark.parametrize("trusted", [False, True], ids=["plain", "accept-rule-for-the-scanner"])
async def test_nmap_smtp_open_relay_finds_no_relay(
    backend: RecordingBackend, start_proxy, tmp_path: Path, trusted: bool
) -> None:
    overrides: dict[str, object] = {**QUIET, "relay_domains": ["example.org", "mx.test.example"]}
    if trusted:
        write_trusting_rule(tmp_path / "rules")
        overrides["rules"] = str(tmp_path / "rules")
    proxy = await start_proxy(overrides)
    text = await smtp_open_relay(proxy.port, nmap_data_dir(tmp_path / "nmap", proxy.port))
    assert "doesn't seem to be an open relay" in text, (text, backend.commands)
    assert not [c for c in backend.commands if c.startswith("RCPT")], backend.commands
    # The proxy still serves after the scan.
    assert await proxy.app.readiness() is None
