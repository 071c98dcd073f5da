"""Brute-force protection for AUTH: failures counted per client IP and per user name.

The counts live in the rate limiter's store (memory, or Redis shared by every
instance), as GCRA buckets of ``max_failures_*`` failures per ``period``
seconds, under the scopes ``auth_fail_ip`` and ``auth_fail_user``. The
``max``-th failure within the period closes the connection (421 4.7.0), and
while a bucket is full every AUTH from that address or for that user gets the
421 before any password is looked at: a new connection per guess does not
help. The buckets drain at the steady rate, so one failure is forgiven every
``period / max`` seconds. Unknown and known users are counted alike: the reply
never tells them apart.
"""

from __future__ import annotations

from smtpproxy.config.submission import BruteForceConfig
from smtpproxy.ratelimit.limiter import RateLimiter

SCOPE_IP, SCOPE_USER = "auth_fail_ip", "auth_fail_user"


class AuthGuard:
    """Asks and counts AUTH failures in the rate limiter's store."""

    def __init__(self, limiter: RateLimiter, config: BruteForceConfig) -> None:
        self.limiter = limiter
        self.config = config
        self._ip = (config.period / config.max_failures_per_ip, config.max_failures_per_ip)
        self._user = (config.period / config.max_failures_per_user, config.max_failures_per_user)

    @property
    def tarpit(self) -> float:
        """Seconds to wait before answering a failure."""
        return self.config.tarpit

    async def _full(self, scope: str, key: str, interval: float, most: int) -> bool:
        # cost 0 with burst most-1 asks without counting: "allowed" while fewer than ``most`` are held.
        return not await self.limiter.take(scope, key, interval, most - 1, 0)

    async def blocked(self, client_ip: str, user: str | None = None) -> bool:
        """True when the address (or ``user``) has used up its failures: refuse AUTH without trying."""
        if await self._full(SCOPE_IP, client_ip, *self._ip):
            return True
        return user is not None and await self._full(SCOPE_USER, user.lower(), *self._user)

    async def failed(self, client_ip: str, user: str | None) -> bool:
        """Count one failure; True when a limit is reached now (answer 421 and close)."""
        over = not await self.limiter.take(SCOPE_IP, client_ip, *self._ip)
        if user is not None:
            over = not await self.limiter.take(SCOPE_USER, user.lower(), *self._user) or over
        return over or await self.blocked(client_ip, user)
