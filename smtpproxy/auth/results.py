"""What sender authentication found for a transaction, read back typed.

SPF (at MAIL), DKIM, ARC and DMARC (at end of DATA) keep their results in
``txn.state`` (``state.put(result)``); DMARC, the Authentication-Results field,
the rules and ``smtpproxy check`` read them through these functions.
"""

from __future__ import annotations

from smtpproxy.auth.arc import ArcResult
from smtpproxy.auth.dkim import DkimResults, DkimSignatureResult
from smtpproxy.auth.dmarc import DmarcResult
from smtpproxy.auth.spf import SpfResult
from smtpproxy.session import Transaction

__all__ = ["arc_result", "dkim_results", "dmarc_result", "spf_result"]


def spf_result(txn: Transaction) -> SpfResult | None:
    """The SPF result, None when SPF did not run."""
    return txn.state.peek(SpfResult)


def dkim_results(txn: Transaction) -> list[DkimSignatureResult]:
    """Each DKIM signature's result ([] when DKIM did not run or found none)."""
    found = txn.state.peek(DkimResults)
    return list(found.signatures) if found is not None else []


def arc_result(txn: Transaction) -> ArcResult | None:
    """The ARC chain's result, None when ARC did not run."""
    return txn.state.peek(ArcResult)


def dmarc_result(txn: Transaction) -> DmarcResult | None:
    """The DMARC result, None when DMARC did not run."""
    return txn.state.peek(DmarcResult)
