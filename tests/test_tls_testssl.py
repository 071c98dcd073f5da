"""A witness we did not write: testssl.sh against the proxy's STARTTLS.

Attacks SECURITY.md's "STARTTLS inbound (TLS 1.2 minimum, the system's secure
cipher defaults)": protocols, cipher categories and the known TLS
vulnerabilities, as testssl.sh judges them.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
import trustme

from tests.backends import RecordingBackend

TESTSSL = shutil.which("testssl") or shutil.which("testssl.sh")
pytestmark = pytest.mark.skipif(TESTSSL is None, reason="testssl.sh is not installed (.ci/run installs it)")

# Findings we accept, and why. CBC suites stay offered with TLS 1.2 (as Postfix's
# default "medium" grade does): an MX that refuses a sender's only suites gets
# the mail in plain text instead. OpenSSL's CBC code is constant-time, which is
# the LUCKY13 fix; testssl.sh can only see that CBC is offered.
ACCEPTED = {"cipherlist_AVERAGE", "LUCKY13", "engine_problem"}
NOT_OFFERED = ("SSLv2", "SSLv3", "TLS1", "TLS1_1", "cipherlist_NULL", "cipherlist_aNULL", "cipherlist_EXPORT")


def write_cert(folder: Path) -> tuple[str, str]:
    cert = trustme.CA().issue_cert("mx.test.example", "127.0.0.1")
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    return str(cert_path), str(key_path)


def read_findings(path: Path) -> dict[str, tuple[str, str]]:
    return {item["id"]: (item["severity"], item["finding"]) for item in json.loads(path.read_text())}


async def test_testssl_finds_no_weak_protocol_cipher_or_vulnerability(
    backend: RecordingBackend, start_proxy, tmp_path: Path
) -> None:
    cert, key = write_cert(tmp_path)
    proxy = await start_proxy({"tls": {"cert": cert, "key": key}})
    report = tmp_path / "testssl.json"
    assert TESTSSL is not None
    proc = await asyncio.create_subprocess_exec(
        TESTSSL,
        "--starttls",
        "smtp",
        "--quiet",
        "--color",
        "0",
        "--warnings",
        "off",
        "-p",  # protocols
        "-s",  # cipher categories
        "-U",  # vulnerabilities
        "--jsonfile",
        str(report),
        f"127.0.0.1:{proxy.port}",
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    await asyncio.wait_for(proc.wait(), 240)
    findings = read_findings(report)
    for name in NOT_OFFERED:
        assert findings[name][1].startswith("not offered"), (name, findings[name])
    assert findings["TLS1_2"][1].startswith("offered")
    bad = {k: v for k, v in findings.items() if v[0] not in ("OK", "INFO") and k not in ACCEPTED}
    assert not bad, bad
    # The scan did not wedge anything: the next client is served.
    assert await proxy.app.readiness() is None
