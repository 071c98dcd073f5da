"""The Redis store: limits shared exactly by every worker and every proxy instance.

Every stage is at most one round trip: one ``EVALSHA`` of the Lua script below
with the keys of all the stage's limits, and of whatever other sessions asked
while the previous call was in flight (group commit, see ``RedisStore``). The
script reads Redis' own clock
(``redis.call('TIME')``) so machines with drifting clocks agree, checks every
entry, and writes them only when all allow — atomically, as Redis runs a script
alone. Keys carry a ``PEXPIRE`` for when they hold nothing any more (GCRA: the
TAT is in the past), so Redis memory follows the active keys only.

Concurrency slots are a sorted set per key: member = connection token, score =
expiry time. Expired members are dropped before counting, so the slots of a
crashed process come back after ``ttl`` on their own; a normal disconnect
removes the member at once (``ZREM``, in the same script).

URLs (``ratelimit_store``):

* ``redis://[user:password@]host:port/db``, ``rediss://...`` (TLS), ``unix:///path.sock?db=0``;
* ``redis+sentinel://[:password@]host:port[,host:port...]/service[/db]``: the
  master of ``service`` as Sentinel reports it, followed on failover;
* ``redis+cluster://[:password@]host:port``: a Redis Cluster. Every key carries
  the hash tag ``{smtpproxy:rl}`` so a stage's keys share one slot and the script
  stays one atomic call; all rate-limit keys thus live on one shard (one shard
  answers far more than a mail system's connection rate).

The store reconnects by itself: a failed connection is dropped and the next
call dials again (a connection Redis closed while it sat idle is replaced and
the call retried at once); after a Redis restart the script is loaded again on
``NOSCRIPT``. Every call is bounded by ``timeout``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff

from smtpproxy.ratelimit.store import REDIS_SCHEMES, Entry, RateEntry, SlotAcquire, StoreError

# One call carries the requests of several sessions (see ``RedisStore``):
# ARGV[1] lists the group sizes ("2,1,3"); each group is one ``apply`` and is
# all-or-nothing on its own, groups run in order as if called one by one.
# Then KEYS[i] and one ARGV per entry, "kind p1 p2 p3" (space-separated: one
# argument instead of four makes the client's command packing 3x cheaper):
#   g: interval_us, burst, cost             (GCRA step)
#   c: token, limit, ttl_us                 (take a concurrency slot)
#   r: token, -, ttl_us                     (refresh a held slot)
#   x: token, -, -                          (release a slot)
# Reply: one integer per entry: 0 allowed, else microseconds until it would be.
# Numbers written to Redis go through string.format: Lua's tostring would print
# microsecond timestamps in 14-digit exponent notation and lose precision.
SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local fmt = function(x) return string.format('%.0f', x) end
local out, last = {}, 0
local arg = {}
for i = 2, #ARGV do
  local kind, p1, p2, p3 = string.match(ARGV[i], '^(%S+) (%S+) (%S+) (%S+)$')
  arg[i - 1] = {kind, p1, p2, p3}
end
for size in string.gmatch(ARGV[1], '%d+') do
  local first = last + 1
  last = last + tonumber(size)
  local tats, refused = {}, false
  for i = first, last do
    local key, e = KEYS[i], arg[i]
    local kind = e[1]
    out[i] = 0
    if kind == 'g' then
      local interval, burst, cost = tonumber(e[2]), tonumber(e[3]), tonumber(e[4])
      local tat = tonumber(redis.call('GET', key))
      if tat == nil or tat < now then tat = now end
      local new_tat = tat + interval * cost
      local allow_at = new_tat - interval * burst
      if allow_at > now then
        out[i] = math.ceil(allow_at - now)
        refused = true
      else
        tats[i] = new_tat
      end
    elseif kind == 'c' then
      redis.call('ZREMRANGEBYSCORE', key, '-inf', fmt(now))
      if not redis.call('ZSCORE', key, e[2])
          and redis.call('ZCARD', key) >= tonumber(e[3]) then
        out[i] = tonumber(e[4])
        refused = true
      end
    end
  end
  if not refused then
    for i = first, last do
      local key, e = KEYS[i], arg[i]
      local kind = e[1]
      if kind == 'g' then
        redis.call('SET', key, fmt(tats[i]), 'PX', fmt(math.ceil((tats[i] - now) / 1000) + 1))
      elseif kind == 'x' then
        redis.call('ZREM', key, e[2])
      else
        local ttl = tonumber(e[4])
        local ms = fmt(math.ceil(ttl / 1000))
        if kind == 'c' then
          redis.call('ZADD', key, fmt(now + ttl), e[2])
          redis.call('PEXPIRE', key, ms)
        elseif redis.call('ZADD', key, 'XX', 'CH', fmt(now + ttl), e[2]) == 1 then
          redis.call('PEXPIRE', key, ms)
        end
      end
    end
  end
end
return out
"""

PREFIX = "smtpproxy:rl:"
CLUSTER_PREFIX = "{smtpproxy:rl}:"


def _client(url: str, timeout: float) -> tuple[Any, str]:
    """The redis-py asyncio client for ``url`` and the key prefix to use."""
    # No retries inside redis-py: the caller's timeout is the budget, and the
    # fail-open/closed policy decides what an error means.
    common: dict[str, Any] = {
        "socket_timeout": timeout,
        "socket_connect_timeout": timeout,
        "retry": Retry(NoBackoff(), 0),
    }
    if url.startswith("redis+cluster://"):
        cluster: Any = RedisCluster.from_url("redis://" + url[len("redis+cluster://") :], **common)
        return cluster, CLUSTER_PREFIX
    if url.startswith("redis+sentinel://"):
        parts = urlsplit(url)
        hosts = parts.netloc.rpartition("@")[2]
        sentinels = []
        for item in hosts.split(","):
            host, _, port = item.rpartition(":")
            sentinels.append((host.strip("[]") or "localhost", int(port or 26379)))
        path = [p for p in parts.path.split("/") if p]
        if not path:
            raise ValueError(
                "redis+sentinel:// URL needs the service name: redis+sentinel://host:26379/mymaster"
            )
        db = int(path[1]) if len(path) > 1 else 0
        password = unquote(parts.password) if parts.password else None
        sentinel = Sentinel(sentinels, sentinel_kwargs={"socket_timeout": timeout}, **common)
        return sentinel.master_for(path[0], db=db, password=password), PREFIX
    # A plain (non-blocking) pool: taking a connection from the blocking one cost
    # more than the script call. Calls are batched per event-loop turn, so few are
    # ever in flight; past the bound a call fails like an unreachable Redis.
    pool: Any = aioredis.ConnectionPool.from_url(url, max_connections=256, **common)
    return aioredis.Redis(connection_pool=pool), PREFIX


@dataclass(frozen=True, slots=True)
class _Release:
    """Give back the slot ``token`` holds on ``key`` (a ``release`` as a script entry)."""

    key: str
    token: str


_Item = Entry | _Release
_Waiter = tuple[Sequence[_Item], "asyncio.Future[list[float]]"]


def _pack(*parts: str | int) -> bytes:
    """One Redis command in RESP, packed by hiredis (C; redis-py packs in Python)."""
    # hiredis' stub types the argument as a 1-tuple; any tuple is accepted.
    packed: bytes = hiredis.pack_command(parts)  # type: ignore[arg-type]
    return packed


def _args(entry: _Item) -> str:
    if isinstance(entry, RateEntry):
        return f"g {entry.interval * 1e6:.3f} {entry.burst} {entry.cost}"
    if isinstance(entry, _Release):
        return f"x {entry.token} 0 0"
    ttl = f"{entry.ttl * 1e6:.0f}"
    if isinstance(entry, SlotAcquire):
        return f"c {entry.token} {entry.limit} {ttl}"
    return f"r {entry.token} 0 {ttl}"


class RedisStore:
    """Rate-limit state in Redis, shared by every process that uses the same URL.

    Group commit: one script call is in flight at a time, and every request
    made meanwhile (by any session) goes out together in the next call, each
    still all-or-nothing on its own. A lone request goes out at once; under
    load, calls carry many sessions' requests, so Redis costs the proxy's single
    core a few round trips per batch instead of one per stage.

    Standalone and Sentinel stores keep one connection of their own and send
    the call packed by hiredis: the generic client path (pool checkout,
    per-call timeouts, Python packing) cost more CPU than the round trip.
    Cluster stores go through redis-py's cluster client.
    """

    def __init__(self, url: str, timeout: float = 0.25, max_batch: int = 256) -> None:
        if not url.startswith(REDIS_SCHEMES):
            raise ValueError(f"expected a URL starting with {', '.join(REDIS_SCHEMES)}, got {url!r}")
        self.url = url
        self.timeout = timeout
        self.max_batch = max_batch
        self._redis, self.prefix = _client(url, timeout)
        self._cluster = isinstance(self._redis, RedisCluster)
        self._script = self._redis.register_script(SCRIPT)
        self._conn: Any = None
        self._queue: list[_Waiter] = []
        self._sender: asyncio.Task[None] | None = None
        self.calls = 0  # script calls made (batches), for the bench and tests

    async def _call(self, coro: Any) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await coro
        except (TimeoutError, redis.exceptions.TimeoutError) as err:
            raise StoreError("timeout", f"redis {self._where()}: no answer within {self.timeout}s") from err
        except (redis.exceptions.ConnectionError, OSError) as err:
            raise StoreError("connection", f"redis {self._where()}: {err}") from err
        except redis.exceptions.RedisError as err:
            raise StoreError("error", f"redis {self._where()}: {err}") from err

    def _where(self) -> str:
        # The URL without its password, for logs.
        parts = urlsplit(self.url)
        return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"

    async def _submit(self, items: Sequence[_Item]) -> list[float]:
        future: asyncio.Future[list[float]] = asyncio.get_running_loop().create_future()
        self._queue.append((items, future))
        if self._sender is None:
            # Started on the next loop turn: requests of this turn join the call.
            self._sender = asyncio.get_running_loop().create_task(self._send_all())
        try:
            async with asyncio.timeout(self.timeout):
                return await future
        except TimeoutError as err:
            raise StoreError("timeout", f"redis {self._where()}: no answer within {self.timeout}s") from err

    async def _send_all(self) -> None:
        try:
            while self._queue:
                batch = [w for w in self._queue[: self.max_batch] if not w[1].done()]
                del self._queue[: self.max_batch]
                if batch:
                    await self._run(batch)
        finally:
            self._sender = None

    async def _run(self, batch: list[_Waiter]) -> None:
        items = [item for entries, _ in batch for item in entries]
        keys = [self.prefix + item.key for item in items]
        args = [",".join(str(len(entries)) for entries, _ in batch)]
        args += [_args(item) for item in items]
        self.calls += 1
        try:
            reply = await self._call(self._eval(keys, args))
        except StoreError as err:
            for _, future in batch:
                if not future.done():
                    future.set_exception(StoreError(err.kind, str(err)))
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        pos = 0
        for entries, future in batch:
            if not future.done():
                future.set_result([int(x) / 1e6 for x in reply[pos : pos + len(entries)]])
            pos += len(entries)

    async def _eval(self, keys: list[str], args: list[str]) -> Any:
        if self._cluster:
            return await self._script(keys=keys, args=args)
        reused = self._conn is not None and self._conn.is_connected
        try:
            return await self._eval_on_own_connection(keys, args)
        except (redis.exceptions.ConnectionError, OSError):
            if not reused:
                raise
        # The connection had been idle and Redis (its ``timeout``, a proxy, a
        # restart) closed it meanwhile: one more try on a fresh connection.
        return await self._eval_on_own_connection(keys, args)

    async def _eval_on_own_connection(self, keys: list[str], args: list[str]) -> Any:
        conn = self._conn
        if conn is None:
            pool = self._redis.connection_pool
            # No socket timeout of its own: ``_call`` bounds the whole call.
            conn = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
            self._conn = conn
        try:
            if not conn.is_connected:
                # connect() (not the implicit one of send): Sentinel asks for the master here.
                await conn.connect()
            await conn.send_packed_command(
                _pack("EVALSHA", self._script.sha, len(keys), *keys, *args), check_health=False
            )
            try:
                return await conn.read_response()
            except redis.exceptions.NoScriptError:
                # Redis restarted or flushed its script cache: EVAL loads it again.
                await conn.send_packed_command(
                    _pack("EVAL", SCRIPT, len(keys), *keys, *args), check_health=False
                )
                return await conn.read_response()
        except BaseException:
            # Cut short (timeout, cancellation) or broken: its next reply could
            # belong to this call, so the connection is not used again.
            self._conn = None
            await conn.disconnect(nowait=True)
            raise

    async def apply(self, entries: Sequence[Entry]) -> list[float]:
        """See ``Store.apply``: one script call, shared with concurrent sessions' calls."""
        if not entries:
            return []
        return await self._submit(entries)

    async def release(self, slots: Sequence[tuple[str, str]]) -> None:
        """See ``Store.release``: removes the members, in the same kind of shared call."""
        if slots:
            await self._submit([_Release(key, token) for key, token in slots])

    async def ping(self) -> bool:
        """True when Redis answers within the timeout (for readiness checks)."""
        try:
            return bool(await self._call(self._redis.ping()))
        except StoreError:
            return False

    async def close(self) -> None:
        """Finish calls in flight, then close the client and its connections."""
        if self._sender is not None:
            await asyncio.wait({self._sender}, timeout=self.timeout * 2)
        try:
            if self._conn is not None:
                await self._conn.disconnect()
            await self._redis.aclose()
        except (redis.exceptions.RedisError, OSError):
            return
