"""What the backend is told about the original client: XCLIENT, XFORWARD and the EHLO after XCLIENT.

The two commands differ in what they do to a connection, and that decides pooling:

- XCLIENT (Postfix ``XCLIENT_README``) replaces the *session's* client: the
  backend answers a new greeting and from then on evaluates its restrictions
  (``check_client_access``, ``smtpd_helo_restrictions``, ``mynetworks``) for
  the impersonated client, for every later transaction on that connection.
  Postfix then re-decides whether XCLIENT is allowed for the *new* client
  (``smtpd_authorized_xclient_hosts``), so an impersonated 127.0.0.2 cannot be
  replaced by the next client: the connection is stuck with its identity. Such
  a connection is therefore never returned to the shared pool; it is closed
  after its transaction, as Postfix's own before-queue proxy
  (``smtpd_proxy_filter``) opens one proxy connection per transaction.
- XFORWARD only changes what the backend logs and records in the queue file
  for the *current transaction*; Postfix resets the attributes when the
  transaction ends (after the reply to the end of DATA, or RSET). A pooled
  connection thus carries no earlier client into the next transaction as long
  as every transaction sends its own complete XFORWARD before MAIL (every
  attribute, ``[UNAVAILABLE]`` for the unknown ones) and an unfinished
  transaction ends with RSET, which ``SmtpTransaction.finish`` does.
"""

from __future__ import annotations

import re

from smtpproxy.backend import ClientFacts
from smtpproxy.backend.wire import xtext

UNAVAILABLE = "[UNAVAILABLE]"

# A HELO argument that can go on our own EHLO line: printable ASCII without
# spaces, at most the 255 octets of a domain name. Anything else came from the
# client and could inject a second command or garble the line.
_SAFE_HELO = re.compile(r"[!-~]{1,255}")


def client_attributes(facts: ClientFacts) -> list[bytes]:
    """The XCLIENT / XFORWARD attributes naming ``facts``' client (each one always present)."""
    attrs = [
        f"ADDR={xtext(facts.ip)}",
        f"PROTO={'ESMTP' if facts.esmtp else 'SMTP'}",
        f"NAME={xtext(facts.rdns) if facts.rdns else UNAVAILABLE}",
        f"HELO={xtext(facts.helo) if facts.helo else UNAVAILABLE}",
    ]
    return [a.encode("ascii") for a in attrs]


def ehlo_name(facts: ClientFacts) -> str:
    """The name for the EHLO after XCLIENT: the client's own HELO, so the backend judges that.

    An EHLO replaces the HELO that XCLIENT set, so sending ours would make
    ``smtpd_helo_restrictions`` and the backend's log see the proxy. A HELO
    that cannot go on a command line safely (or none) becomes the client's
    address literal (RFC 5321 section 4.1.3), which is what the client was.
    """
    if facts.helo and _SAFE_HELO.fullmatch(facts.helo):
        return facts.helo
    return f"[IPv6:{facts.ip}]" if ":" in facts.ip else f"[{facts.ip}]"
