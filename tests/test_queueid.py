"""The backend's queue id read from its 250 to the end of DATA (Postfix, Exim, Exchange, others)."""

from __future__ import annotations

import pytest

from smtpproxy.backend.queueid import queue_id
from smtpproxy.verdict import Reply


@pytest.mark.parametrize(
    ("code", "message", "expected"),
    [
        (250, "2.0.0 Ok: queued as 304B120E671", "304B120E671"),  # Postfix, short ids
        (250, "2.0.0 Ok: queued as 4XbKzN1mQpz9sQv", "4XbKzN1mQpz9sQv"),  # Postfix, long ids
        (250, "OK id=1rXbKz-0004Qp-7C", "1rXbKz-0004Qp-7C"),  # Exim
        (
            250,
            "2.6.0 <abc@mail.example> [InternalId=1460288174093, Hostname=EX01.corp.example] "
            "3456 bytes in 0.101, 33.314 KB/sec Queued mail for delivery",
            "1460288174093",
        ),  # Exchange
        (250, "2.0.0 4B1KzN1m012345 Message accepted for delivery", "4B1KzN1m012345"),  # Sendmail
        (250, "Ok: 1A2B3C4D5E", "1A2B3C4D5E"),
        (250, "Ok 0100018c3f0e5b1a-3c1e2a7b-0000", "0100018c3f0e5b1a-3c1e2a7b-0000"),  # Amazon SES
        (250, "2.0.0 Ok", None),
        (250, "2.0.0 Message accepted", None),
        (250, "OK", None),
        (451, "4.3.0 queued as NOTREALLY", None),
    ],
)
def test_queue_id_forms(code: int, message: str, expected: str | None) -> None:
    assert queue_id(Reply.parse(code, message)) == expected
