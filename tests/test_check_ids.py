"""``smtpproxy check`` names the transaction (the id of its Received field) and the Message-ID."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from smtpproxy.cli import main
from tests.dnsserver import DnsServer
from tests.smtpclient import make_message


def test_check_output_has_the_transaction_id_of_the_received_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], dns_server: DnsServer
) -> None:
    cfg = tmp_path / "smtpproxy.yaml"
    cfg.write_text(
        "hostname: mx.test.example\nrelay_domains: [example.org]\nrules: null\nmetrics: null\n"
        f"dns: {{reverse_lookup: false, timeout: 2.0, nameservers: ['{dns_server.address}']}}\n"
    )
    message = tmp_path / "m.eml"
    message.write_bytes(make_message("ids"))
    args = ["--mail-from", "a@sender.example", "--rcpt", "user@example.org", str(message)]
    assert main(["check", "--config", str(cfg), *args]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["action"] == "continue", out
    assert f"with ESMTP id {out['transaction']}" in out["headers_added"][0]
    assert out["message_id"].startswith("<m") and out["message_id"].endswith("@sender.example>")
    # No backend, no backend queue: the field is there, empty.
    assert "queue_id" in out and out["queue_id"] is None
