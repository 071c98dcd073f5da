"""GCRA (generic cell rate algorithm): a smooth rate limit with a burst, as pure functions.

One number per key, the *theoretical arrival time* (TAT): when the bucket would
be empty again if requests kept arriving at exactly the permitted rate. With
emission interval ``T = period / count`` and a burst of ``B``:

* a request at ``now`` costs ``T``: ``new_tat = max(tat, now) + T``;
* it is allowed when ``new_tat - now <= B * T`` (at most ``B`` requests back to
  back, then one every ``T``), and only then is ``new_tat`` stored.

This is a token bucket of size ``B`` refilled continuously at the rate, kept in
one number and with no fixed windows: there is no window edge where a client
gets twice its allowance. The functions take ``now`` explicitly (an injectable
clock) so tests need no real time; the stores supply the clock (monotonic time
in memory, Redis server ``TIME`` in Redis, so several machines agree).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import NamedTuple

# The units of ``rate: N/unit`` in the configuration, in seconds.
UNITS: dict[str, float] = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}

# Float slack so that exactly "one interval later" is allowed despite rounding.
_EPSILON = 1e-9

_RATE = re.compile(r"^\s*(\d+)\s*/\s*([a-z]+?)s?\s*$")


@dataclass(frozen=True, slots=True)
class Rate:
    """``count`` requests per ``unit`` (second, minute, hour or day): ``Rate(60, "minute")``."""

    count: int
    unit: str

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ValueError(f"rate count must be >= 1, got {self.count}")
        if self.unit not in UNITS:
            raise ValueError(f"rate unit must be one of {', '.join(UNITS)}, got {self.unit!r}")

    @property
    def period(self) -> float:
        """Length of the unit in seconds."""
        return UNITS[self.unit]

    @property
    def interval(self) -> float:
        """Emission interval ``T``: seconds between requests at the steady rate."""
        return self.period / self.count

    def default_burst(self) -> int:
        """The burst when the config gives none: the rate's own count.

        ``100/minute`` thus admits 100 at once, then refills at 100 per minute,
        which is what operators read into "100 per minute" (a full bucket), and
        never refuses the second recipient of a message as a burst of 1 would.
        """
        return self.count

    def __str__(self) -> str:
        return f"{self.count}/{self.unit}"


def parse_rate(text: str) -> Rate:
    """Parse ``N/second|minute|hour|day`` (a trailing ``s`` is accepted: ``10/hours``).

    Raises ValueError naming what was expected.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a rate like 60/minute, got {text!r}")
    m = _RATE.match(text.lower())
    if not m or m.group(2) not in UNITS:
        raise ValueError(f"expected a rate like 60/minute (units: {', '.join(UNITS)}), got {text!r}")
    return Rate(int(m.group(1)), m.group(2))


class Decision(NamedTuple):
    """Outcome of one GCRA step.

    ``tat`` is the value to store (unchanged when refused); ``retry_after`` is
    0 when allowed, else the seconds until the same request would be allowed.
    """

    allowed: bool
    tat: float
    retry_after: float


def gcra(tat: float | None, now: float, interval: float, burst: int, cost: int = 1) -> Decision:
    """One GCRA step for a key whose stored TAT is ``tat`` (None: never seen).

    ``interval`` is the emission interval in seconds, ``burst`` >= 1 the most
    requests admitted back to back, ``cost`` the units this request uses.
    """
    if interval <= 0 or burst < 1 or cost < 0:
        raise ValueError("interval must be > 0, burst >= 1, cost >= 0")
    base = now if tat is None or tat < now else tat
    new_tat = base + interval * cost
    allow_at = new_tat - interval * burst
    if allow_at <= now + _EPSILON:
        return Decision(True, new_tat, 0.0)
    return Decision(False, base, allow_at - now)


def ceil_ms(seconds: float) -> int:
    """Seconds as whole milliseconds, rounded up and at least 1 (for PEXPIRE)."""
    return max(1, math.ceil(seconds * 1000))
