"""The budget of message bytes in flight (``limits.max_inflight_bytes``).

Every DATA holds its message in memory until the backend has answered: without
a total cap, 1,000 connections x 25 MB ask for 25 GB and the kernel's OOM
killer answers. Past the budget, DATA gets ``452 4.3.1`` and the sender retries
later; nothing is lost.

When is a message charged? Reserving ``max_message_size`` for every DATA would
refuse small mail at a few dozen concurrent transactions for no reason, so the
bytes are charged as they arrive, plus what the client declared with
``SIZE=`` up front (a client announcing a message that cannot fit is refused
before it sends a byte). A message that crosses the budget while it arrives is
not held any longer: the rest is read and discarded, as for an oversized
message, and it gets ``452 4.3.1`` after its final dot. Memory thus stays below
the budget (plus one read chunk) whatever the clients do, which reserving
up front would promise too, at the price of refusing mail the budget could take.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from prometheus_client import Gauge

# The default budget: an eighth of physical memory. memory_bench measures about
# two to three bytes of RSS per message byte in flight (the received copy, the
# copy with our header edits, socket buffers), so that is under half the RAM.
RAM_SHARE = 8
FLOOR = 256 * 1024 * 1024  # also where sysconf cannot tell


def default_budget() -> int:
    """An eighth of the machine's physical memory, at least 256 MB."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return FLOOR
    return max(FLOOR, ram // RAM_SHARE)


@dataclass(slots=True)
class InflightBudget:
    """Message bytes held by all transactions of this process, against ``limit``."""

    limit: int
    gauge: Gauge
    used: int = 0

    def open(self, declared: int) -> Ticket | None:
        """A ticket for one message, ``declared`` bytes reserved; None when they do not fit."""
        ticket = Ticket(self)
        return ticket if ticket.need(declared) else None

    def _add(self, n: int) -> None:
        self.used += n
        self.gauge.set(self.used)


@dataclass(slots=True)
class Ticket:
    """What one message has charged to the budget; ``release()`` gives it back (safe twice)."""

    budget: InflightBudget
    charged: int = field(default=0)

    def need(self, total: int) -> bool:
        """Charge up to ``total`` bytes for this message; False (nothing charged) when over budget."""
        extra = total - self.charged
        if extra <= 0:
            return True
        if self.budget.used + extra > self.budget.limit:
            return False
        self.budget._add(extra)
        self.charged = total
        return True

    def release(self) -> None:
        """The message is no longer held."""
        if self.charged:
            self.budget._add(-self.charged)
            self.charged = 0
