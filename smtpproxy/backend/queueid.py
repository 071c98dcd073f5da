"""The backend's queue id, read from its 250 reply to the end of DATA.

With it an operator goes from our log line to the backend's log (``grep`` the
id in Postfix's maillog, Exim's mainlog, Exchange's message tracking). The
forms are the common servers' own; anything else gives None, never a guess
from arbitrary words of the text.
"""

from __future__ import annotations

import re

from smtpproxy.verdict import Reply

_FORMS = (
    # Postfix: "2.0.0 Ok: queued as 4XbKzN1mQpz9sQv" (also Haraka, qpsmtpd).
    re.compile(r"\bqueued as ([A-Za-z0-9][A-Za-z0-9._:-]*)"),
    # Exim: "OK id=1rXbKz-0004Qp-7C".
    re.compile(r"\bid=([A-Za-z0-9][A-Za-z0-9-]*)"),
    # Exchange: "2.6.0 <mid@host> [InternalId=1234567, Hostname=EX1] Queued mail for delivery".
    re.compile(r"\[InternalId=(\d+)"),
    # Sendmail: "2.0.0 4B1KzN1m012345 Message accepted for delivery".
    re.compile(r"^([A-Za-z0-9]{8,}) Message accepted for delivery"),
    # "Ok: 1A2B3C4D", "Ok 0100018c..." (Amazon SES and other queue ids after a bare Ok).
    re.compile(r"^Ok:? ([A-Za-z0-9][A-Za-z0-9._-]{5,})$", re.IGNORECASE),
)


def queue_id(reply: Reply) -> str | None:
    """The queue id in a positive reply's text, None when it names none (or the reply is negative)."""
    if not reply.is_positive:
        return None
    text = reply.text.split("\n", 1)[0].strip()
    for form in _FORMS:
        m = form.search(text)
        if m is not None:
            return m.group(1)[:64]
    return None
