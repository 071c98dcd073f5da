"""What one MTA connection may use of the application: a narrow interface instead of the App.

As :mod:`smtpproxy.context` is for SMTP connections: ``app`` builds the milter
listener, and the milter sees only this, so the two form no import circle.
"""

from __future__ import annotations

from typing import Protocol

from smtpproxy.config import Config
from smtpproxy.inflight import InflightBudget
from smtpproxy.logs import EventLog
from smtpproxy.metrics import Metrics
from smtpproxy.policy import Policy


class MilterContext(Protocol):
    """The services a milter connection uses."""

    config: Config
    metrics: Metrics
    logs: EventLog
    milter_policy: Policy
    inflight: InflightBudget
    draining: bool
