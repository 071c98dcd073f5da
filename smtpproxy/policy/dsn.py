"""Delivery status notification parameters (RFC 3461): validated here, passed on unchanged.

The proxy never writes a DSN itself (that would be backscatter): the backend
does, so ``RET``/``ENVID`` on MAIL and ``NOTIFY``/``ORCPT`` on RCPT only have to
be well formed, on the right command, given once, and reach a backend that
offers DSN. What "well formed" means is RFC 3461 §4 (xtext) and §4.1-4.4.
"""

from __future__ import annotations

import re

from smtpproxy.verdict import Reply

DSN = "DSN"  # the EHLO keyword, and the name in ``Decision.needs``

MAIL_PARAMS = frozenset({"RET", "ENVID"})
RCPT_PARAMS = frozenset({"NOTIFY", "ORCPT"})
KEYWORDS = MAIL_PARAMS | RCPT_PARAMS

# xtext (§4): printable ASCII except "+" and "=", or "+" and two upper-case hex digits.
_XTEXT = re.compile(r"^(?:[!-*,-<>-~]|\+[0-9A-F]{2})*$")
# addr-type is an atom (RFC 5322): "rfc822", "utf-8", "x400".
_ADDR_TYPE = re.compile(r"^[A-Za-z0-9!#$%&'*+\-/=?^_`{|}~]+$")
_NOTIFY_WORDS = frozenset({"SUCCESS", "FAILURE", "DELAY"})
MAX_ENVID = 100  # §4.4
MAX_ORCPT = 500  # §4.2


def _bad(text: str) -> Reply:
    return Reply(501, "5.5.4", text)


def keyword(param: str) -> str:
    """The upper-cased keyword of an ESMTP parameter (``orcpt=rfc822;a@b`` -> ``ORCPT``)."""
    return param.partition("=")[0].upper()


def is_xtext(value: str) -> bool:
    """True when ``value`` is valid RFC 3461 xtext."""
    return _XTEXT.match(value) is not None


def decode_xtext(value: str) -> str:
    """The text an xtext value stands for (``a+2Bb`` -> ``a+b``); ``value`` must be valid xtext."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


def _check_value(name: str, value: str) -> Reply | None:
    if name == "RET":
        if value.upper() not in ("FULL", "HDRS"):
            return _bad("RET must be FULL or HDRS (RFC 3461 4.3)")
    elif name == "ENVID":
        if not value or not is_xtext(value):
            return _bad("Syntax error in ENVID parameter: expected xtext (RFC 3461 4)")
        if len(value) > MAX_ENVID:
            return _bad(f"ENVID parameter longer than {MAX_ENVID} characters (RFC 3461 4.4)")
    elif name == "NOTIFY":
        words = value.upper().split(",")
        never = words == ["NEVER"]
        if not never and (not set(words) <= _NOTIFY_WORDS or len(set(words)) != len(words)):
            return _bad("NOTIFY must be NEVER or a list of SUCCESS, FAILURE, DELAY (RFC 3461 4.1)")
    elif name == "ORCPT":
        addr_type, sep, address = value.partition(";")
        if not sep or not _ADDR_TYPE.match(addr_type) or not address or not is_xtext(address):
            return _bad("Syntax error in ORCPT parameter: expected addr-type;xtext (RFC 3461 4.2)")
        if len(value) > MAX_ORCPT:
            return _bad(f"ORCPT parameter longer than {MAX_ORCPT} characters (RFC 3461 4.2)")
    return None


def check(
    params: tuple[str, ...], allowed: frozenset[str], command: str, *, offered: bool
) -> tuple[Reply | None, bool]:
    """Validate the DSN parameters among ``params`` of ``command`` (MAIL or RCPT).

    ``offered``: our EHLO reply to this client offered DSN. Returns (the
    refusal, or None; whether any DSN parameter was given, so the backend
    connection must offer DSN). Other parameters are not looked at here.
    """
    seen: set[str] = set()
    for param in params:
        name = keyword(param)
        if name not in KEYWORDS:
            continue
        if not offered:
            return not_offered_reply(command), True
        if name not in allowed:
            other = "RCPT TO" if command == "MAIL FROM" else "MAIL FROM"
            return Reply(555, "5.5.4", f"{name} is a {other} parameter, not a {command} one"), True
        if name in seen:
            return _bad(f"{name} parameter given twice (RFC 3461 4)"), True
        seen.add(name)
        _, eq, value = param.partition("=")
        if not eq:
            return _bad(f"{name} parameter needs a value (RFC 3461 4)"), True
        refusal = _check_value(name, value)
        if refusal is not None:
            return refusal, True
    return None, bool(seen)


def check_mail(params: tuple[str, ...], *, offered: bool) -> tuple[Reply | None, bool]:
    """``RET=``/``ENVID=`` of a MAIL FROM: (the refusal or None, whether DSN is asked for)."""
    return check(params, MAIL_PARAMS, "MAIL FROM", offered=offered)


def check_rcpt(params: tuple[str, ...], *, offered: bool) -> tuple[Reply | None, bool]:
    """``NOTIFY=``/``ORCPT=`` of a RCPT TO: (the refusal or None, whether DSN is asked for)."""
    return check(params, RCPT_PARAMS, "RCPT TO", offered=offered)


def not_offered_reply(command: str) -> Reply:
    """The refusal of DSN parameters when our EHLO did not offer DSN (the backend does not)."""
    names = "RET/ENVID" if command == "MAIL FROM" else "NOTIFY/ORCPT"
    return Reply(
        555, "5.5.4", f"{command} parameters {names} not supported: the destination mail server offers no DSN"
    )


def unsupported_reply(command: str) -> Reply:
    """The refusal when we offered DSN but this transaction's backend connection lacks it.

    Transient: the client did nothing wrong (our EHLO said DSN), and the next
    EHLO tells the truth, so its retry comes without the parameters.
    """
    return Reply(
        451, "4.3.0", f"The destination mail server stopped offering DSN ({command}), try again later"
    )
