"""Stock replies, and enhanced status codes for the replies aiosmtpd writes itself.

A leaf module: every reply the proxy makes up itself (not a check's, a rule's or
the backend's) is written here once, so texts cannot drift between front ends.
"""

from __future__ import annotations

import re

from smtpproxy.verdict import Action, Reply

_HAS_ENHANCED = re.compile(r"^\d{3}[ -][245]\.\d{1,3}\.\d{1,3}( |$)")
# Enhanced codes (RFC 3463) for the replies aiosmtpd writes itself.
_ENHANCED_FOR = {
    "221": "2.0.0",
    "421": "4.7.0",
    "451": "4.3.0",
    "500": "5.5.2",
    "501": "5.5.4",
    "502": "5.5.1",
    "503": "5.5.1",
    "504": "5.5.4",
    "530": "5.7.0",
    "550": "5.7.1",
    "552": "5.3.4",
    "553": "5.1.3",
    "554": "5.7.0",
    "555": "5.5.4",
}
# Replies aiosmtpd writes for bad commands, and how session limits count them.
ERROR_KINDS = {
    "500": "invalid_command",
    "502": "invalid_command",
    "501": "syntax",
    "503": "syntax",
    "504": "syntax",
    "555": "syntax",
}


def with_enhanced_code(status: str) -> str:
    """Add an RFC 3463 enhanced code to a one-line reply that lacks one."""
    if len(status) < 4 or status[3] != " " or _HAS_ENHANCED.match(status):
        return status
    code = status[:3]
    enhanced = _ENHANCED_FOR.get(code)
    if enhanced is None:
        return status
    return f"{code} {enhanced} {status[4:]}"


# -- stock replies: the one place their codes and texts are written ------------------

OK = Reply(250, "2.0.0", "Ok")
BYE = Reply(221, "2.0.0", "Bye")
DEFAULT_REJECT = Reply(550, "5.7.1", "Message rejected by policy")
DEFAULT_TEMPFAIL = Reply(451, "4.7.1", "Message deferred by policy, please try again later")
CONNECTION_REFUSED = Reply(554, "5.7.1", "Connection refused by policy")
INTERNAL_ERROR = Reply(451, "4.3.0", "Temporary internal error, please try again later")
SHUTTING_DOWN = Reply(421, "4.3.2", "Service shutting down, please try again later")
NEED_MAIL = Reply(503, "5.5.1", "Error: need MAIL command")
BAD_SENDER = Reply(553, "5.1.7", "Bad sender address syntax")
BAD_RECIPIENT = Reply(553, "5.1.3", "Bad recipient address syntax")
NO_VALID_RECIPIENTS = Reply(554, "5.5.1", "No valid recipients")


def default_reply(action: Action) -> Reply:
    """The reply of a refusal that named none: tempfail answers 451 4.7.1, reject 550 5.7.1."""
    return DEFAULT_TEMPFAIL if action is Action.TEMPFAIL else DEFAULT_REJECT


def discarded(txn_id: str) -> Reply:
    """What a client hears for a discarded message: success (the message goes nowhere)."""
    return Reply(250, "2.0.0", f"Ok: {txn_id} discarded")
