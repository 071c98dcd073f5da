"""The sections of the configuration about sender authentication: SPF, DKIM, ARC, DMARC."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from smtpproxy.config.base import DomainList, PositiveFloat, Section


class SpfConfig(Section):
    """SPF (RFC 7208) at MAIL FROM; by default the decision is left to DMARC."""

    enabled: bool = True
    reject_on_fail: bool = False  # 550 5.7.23 on "fail" without waiting for DMARC
    helo_check: bool = True  # check the HELO identity when MAIL FROM is <>
    tempfail_on_temperror: bool = False  # 451 4.4.3 when DNS fails during SPF
    timeout: PositiveFloat = 15.0  # whole evaluation; keep below check_timeout


class DkimConfig(Section):
    """DKIM verification (RFC 6376) of every signature, topmost first."""

    enabled: bool = True
    max_signatures: Annotated[int, Field(ge=1, le=50)] = 5  # more are ignored (CPU bound per message)
    min_key_bits: Annotated[int, Field(ge=512, le=8192)] = 1024  # smaller RSA keys -> dkim=policy (RFC 8301)


class ArcConfig(Section):
    """ARC chain validation (RFC 8617): recorded for rules and for dmarc.trusted_arc_sealers."""

    enabled: bool = True


class DmarcConfig(Section):
    """DMARC (RFC 7489) evaluation and enforcement at end of DATA.

    ``enforce``: apply the domain's p=reject (550 5.7.1) and p=quarantine.
    ``temperror_action``: a DNS failure during DMARC answers 451 4.4.3 ("tempfail") or passes ("accept").
    ``report_only``: record results and add headers, never reject, quarantine or tempfail.
    ``trusted_arc_sealers``: a DMARC failure is not enforced when the ARC chain passes and its
    newest seal is by one of these domains (forwarders and mailing lists you trust).
    """

    enabled: bool = True
    enforce: bool = True
    temperror_action: Literal["tempfail", "accept"] = "tempfail"
    report_only: bool = False
    quarantine_header: str = "X-Quarantine"
    trusted_arc_sealers: DomainList = []

    @field_validator("quarantine_header")
    @classmethod
    def _valid_header_name(cls, value: str) -> str:
        if not value or not all(33 <= ord(c) <= 126 and c != ":" for c in value):
            raise ValueError("expected a header field name (printable ASCII, no colon or spaces)")
        return value
