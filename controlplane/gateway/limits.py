"""Per-key requests-per-minute and tokens-per-minute, enforced across web processes.

Fixed one-minute windows kept in Redis (one pipelined round trip per request
of a limited key, none for keys without limits). Tokens are known only when
the engine answers, so an admitted request reserves what it may use (its
prompt's estimate and its `max_tokens`, which the gateway always sets) and
settles on its usage: a window admits requests while their reservations and
usage fit the limit, however many run at once. Without `REDIS_URL` the
counters live in this process: right for the embedded single web process.

When Redis does not answer (down, restarting, slow past a second), limits fail
open: the request is admitted uncounted, with a warning in the log (at most one
every ten seconds) and `llmfleet_rate_limit_unavailable_total`. A limit is a
guard against overuse, and refusing every request of every limited key while
Redis restarts would be an outage of its own.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass

import redis.asyncio as aioredis
from django.conf import settings

from controlplane import metrics
from controlplane.gateway.models import ApiKey

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60
_WARN_EVERY_SECONDS = 10.0
_warned_at = -1e9
# The counters without Redis: the process's (the embedded fleet runs one web process), shared
# by its event loops as Redis would be.
_local: Counter[str] = Counter()


class Reservation:
    """The tokens a request reserved in its window, settled once on what it used (0: it never
    reached an engine)."""

    def __init__(self, limiter: Limiter, key: ApiKey, window: int, tokens: int) -> None:
        self.limiter, self.key, self.window, self.tokens = limiter, key, window, tokens
        self.settled = False

    async def settle(self, used: int) -> None:
        if self.settled:
            return
        self.settled = True
        await self.limiter.add_tokens(self.key, used - self.tokens, window=self.window)


@dataclass(frozen=True)
class Refusal:
    """Why a request must wait, and for how long."""

    message: str
    retry_after: int


def _window(now: float) -> tuple[int, int]:
    """The current window's number and the seconds left in it."""
    number = int(now // WINDOW_SECONDS)
    return number, max(1, int((number + 1) * WINDOW_SECONDS - now))


def _unavailable(exc: Exception) -> None:
    global _warned_at
    metrics.RATE_LIMIT_UNAVAILABLE.inc()
    if time.monotonic() - _warned_at >= _WARN_EVERY_SECONDS:
        _warned_at = time.monotonic()
        log.warning("rate limits not enforced: Redis did not answer (%s)", exc)


class Limiter:
    """One event loop's way to the counters (controlplane.gateway.state): its Redis client,
    since an asyncio Redis connection belongs to the loop that opened it."""

    def __init__(self) -> None:
        self.clients: dict[str, aioredis.Redis] = {}

    def _client(self) -> aioredis.Redis | None:
        url = settings.REDIS_URL
        if not url:
            return None
        if url not in self.clients:
            self.clients[url] = aioredis.Redis.from_url(
                url, socket_timeout=1, socket_connect_timeout=1
            )
        return self.clients[url]

    async def close(self) -> None:
        clients, self.clients = self.clients, {}
        for client in clients.values():
            await client.aclose()

    async def _counts(
        self, key: ApiKey, window: int, add_request: bool, reserve: int
    ) -> tuple[int, int]:
        """The window's requests and tokens, this request and its reservation included."""
        requests_name = f"llmfleet:rate:{key.pk}:{window}:requests"
        tokens_name = f"llmfleet:rate:{key.pk}:{window}:tokens"
        client = self._client()
        if client is None:
            if add_request:
                _local[requests_name] += 1
            _local[tokens_name] += reserve
            return _local[requests_name], _local[tokens_name]
        async with client.pipeline(transaction=False) as pipe:
            if add_request:
                pipe.incr(requests_name)
                pipe.expire(requests_name, WINDOW_SECONDS * 2)
            else:
                pipe.get(requests_name)
            if reserve:
                pipe.incrby(tokens_name, reserve)
                pipe.expire(tokens_name, WINDOW_SECONDS * 2)
                results = await pipe.execute()
                return int(results[0] or 0), int(results[-2])
            pipe.get(tokens_name)
            results = await pipe.execute()
        return int(results[0] or 0), int(results[-1] or 0)

    async def admit(
        self, key: ApiKey, reserve: int = 0, now: float | None = None
    ) -> Refusal | Reservation | None:
        """Count the request against the key's limits and reserve `reserve` tokens of its
        window: a Refusal when it is over one (its reservation given back), else the
        Reservation to settle (None when the key has no tokens limit). Lets the request in,
        uncounted, when Redis does not answer (the module's docstring says why)."""
        if key.requests_per_minute is None and key.tokens_per_minute is None:
            return None
        window, left = _window(time.time() if now is None else now)
        reserve = reserve if key.tokens_per_minute is not None else 0
        try:
            requests, tokens = await self._counts(
                key, window, key.requests_per_minute is not None, reserve
            )
        except (aioredis.RedisError, OSError) as exc:
            _unavailable(exc)
            return None
        refusal = None
        if key.requests_per_minute is not None and requests > key.requests_per_minute:
            refusal = Refusal(
                f"Rate limit reached: {key.requests_per_minute} requests per minute.", left
            )
        # Past the limit with this reservation, unless the window held nothing before it: a
        # request larger than the whole limit still runs, once a window.
        elif (
            key.tokens_per_minute is not None
            and tokens > key.tokens_per_minute
            and (tokens > reserve)
        ):
            refusal = Refusal(
                f"Rate limit reached: {key.tokens_per_minute} tokens per minute (this request "
                f"reserves {reserve}: its prompt and max_tokens).", left,
            )  # fmt: skip
        if refusal is not None:
            await self.add_tokens(key, -reserve, window=window)
            return refusal
        return Reservation(self, key, window, reserve) if reserve else None

    async def add_tokens(
        self, key: ApiKey, tokens: int, now: float | None = None, window: int | None = None
    ) -> None:
        """Charge tokens (a reservation given back: fewer than none) to the key's window: the
        one named, else the current one."""
        if key.tokens_per_minute is None or tokens == 0:
            return
        if window is None:
            window, _ = _window(time.time() if now is None else now)
        name = f"llmfleet:rate:{key.pk}:{window}:tokens"
        client = self._client()
        if client is None:
            _local[name] += tokens
            return
        try:
            async with client.pipeline(transaction=False) as pipe:
                pipe.incrby(name, tokens)
                pipe.expire(name, WINDOW_SECONDS * 2)
                await pipe.execute()
        except (aioredis.RedisError, OSError) as exc:
            _unavailable(exc)
