"""The gateway's per-process state, with one owner: one `GatewayState` per event loop.

An asyncio client (a connection to an agent, aiohttp's session, a Redis connection, a
task) belongs to the loop that made it. daphne runs one loop; tests and management
commands make others. So everything the gateway keeps between requests lives in one
object per loop, made in one place (`current`) and closed in one place (`close`, as the
web process stops): the connections to the agents (and the KV feeds' aiohttp session),
the usage and request-figure buffers, the cache, the cold-start watches, the limiter's
Redis clients, admission's queues and the router. The modules that use any of it take
it from their caller; none keeps its own.

Two things are deliberately the process's, not a loop's: what the cache remembers of
the database's rows (plain values, valid on every loop: `cache.MEMORY`) and the
rate limiter's in-process counters (the embedded fleet's stand-in for Redis).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable

import aiohttp

from controlplane.gateway.admission import Admission
from controlplane.gateway.agenthttp import AgentConnections
from controlplane.gateway.cache import Cache
from controlplane.gateway.coldstart import Watches
from controlplane.gateway.kvfollow import KvFollowers
from controlplane.gateway.limits import Limiter
from controlplane.gateway.router import Router
from controlplane.gateway.stats import StatsBuffer
from controlplane.gateway.usage import UsageBuffer

log = logging.getLogger(__name__)


class GatewayState:
    """What one event loop's gateway keeps between requests."""

    def __init__(self) -> None:
        self.agents = AgentConnections()  # the warm path's connections to the node agents
        self._session: aiohttp.ClientSession | None = None  # the KV feeds' and their files'
        self.usage = UsageBuffer()
        self.stats = StatsBuffer()
        self.cache = Cache()
        self.watches = Watches()
        self.limiter = Limiter()
        self.admission = Admission()  # seats on each model's replicas, and who waits for one
        # Tasks started off a request's path. The event loop keeps only weak references to
        # tasks, so this set holds each until it ends.
        self.background: set[asyncio.Future[object]] = set()
        self.router = Router(self)
        self.kv = KvFollowers(self)  # precise routing's: each replica's engine's KV blocks

    @property
    def session(self) -> aiohttp.ClientSession:
        """An aiohttp session to the node agents for what is off the warm path (precise
        routing's KV feeds), made on first use: in the loop."""
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
            self._session = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, skip_auto_headers={"Accept-Encoding"}
            )
        return self._session

    def in_background(self, work: Awaitable[object]) -> None:
        """Run `work` on the running loop without anyone awaiting it."""
        task = asyncio.ensure_future(work)
        self.background.add(task)
        task.add_done_callback(self.background.discard)

    async def close(self) -> None:
        """As the web process stops: write what is buffered, close what is open. Each step on
        its own: one that fails stops no other."""
        for what, step in (
            ("usage", self.usage.flush),
            ("request figures", self.stats.flush),
            ("KV feeds", self.kv.close),
            ("agent connections", self._close_agent_clients),
            ("rate-limit clients", self.limiter.close),
        ):
            try:
                await step()
            except Exception:
                log.exception("could not close the gateway's %s as the web process stopped", what)

    async def _close_agent_clients(self) -> None:
        self.agents.close()
        # aiohttp logs an ERROR for a session left open when the process exits.
        if self._session is not None:
            await self._session.close()


_states: dict[asyncio.AbstractEventLoop, GatewayState] = {}


def current() -> GatewayState:
    """The running event loop's state, made on first use; states of closed loops are dropped."""
    loop = asyncio.get_running_loop()
    state = _states.get(loop)
    if state is None:
        for closed in [other for other in _states if other.is_closed()]:
            del _states[closed]
        state = _states[loop] = GatewayState()
    return state


async def close_current() -> None:
    """Close the running loop's state, if it made one (the web process is stopping)."""
    state = _states.pop(asyncio.get_running_loop(), None)
    if state is not None:
        await state.close()


def forget_cached() -> None:
    """What every loop's cache holds, and the process's memory of rows, forgotten: the next
    lookup asks the database (tests that wrote rows; an operator's change seen at once)."""
    from controlplane.gateway import cache

    cache.MEMORY.clear()
    for state in _states.values():
        state.cache.forget()
