"""Reply text helpers: enhanced status codes for the replies aiosmtpd writes itself."""

from __future__ import annotations

import re

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


# <local@domain> where local is a dot-atom and domain a plain name: no parser needed.


def with_enhanced_code(status: str) -> str:
    """Add an RFC 3463 enhanced code to a one-line reply that lacks one."""
    if len(status) < 4 or status[3] != " " or _HAS_ENHANCED.match(status):
        return status
    code = status[:3]
    enhanced = _ENHANCED_FOR.get(code)
    if enhanced is None:
        return status
    return f"{code} {enhanced} {status[4:]}"
