"""The agent's connections to its engines, kept between exchanges (one pool per engine address).

A connection is kept only once its exchange ended cleanly, and for less than the
engine's own keep-alive; one the engine closed meanwhile (nothing of an answer came
back) is replaced by a new one and the request sent again, the engine never having
seen it. nodeagent.relay runs each exchange.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Hashable, Mapping
from typing import Generic, Protocol, TypeVar
from urllib.parse import quote

from nodeagent.http1 import Head
from nodeagent.relay import EngineConnection, EngineUnreachable

# How long a kept connection may sit idle before it is used again: under the keep-alive of
# vLLM's server (uvicorn's, 5 s), so that a kept connection is not one the engine is closing.
KEEP_IDLE_SECONDS = 2.0
KEEP_PER_ENGINE = 256
CONNECT_SECONDS = 5.0
PATH_SAFE = "/:@!$&'()*+,;=-._~"


class Keepable(Protocol):
    """A connection that runs one exchange at a time (nodeagent.relay's to an engine, the web
    process's to an agent)."""

    idle_since: float

    @property
    def key(self) -> Hashable: ...
    @property
    def closed(self) -> bool: ...
    @property
    def reusable(self) -> bool: ...
    def abandon(self) -> None: ...


K = TypeVar("K", bound=Hashable)
C = TypeVar("C", bound=Keepable)


class Kept(Generic[K, C]):
    """Connections kept between exchanges, per address: one is kept only once its exchange
    ended cleanly, at most `per_address` of them, and reused only within `idle_seconds`
    (under the server's own keep-alive, so that it is not one the server is closing)."""

    def __init__(self, idle_seconds: float, per_address: int) -> None:
        self.idle_seconds = idle_seconds
        self.per_address = per_address
        self._kept: dict[K, list[C]] = {}

    def take(self, key: K) -> C | None:
        """The latest kept connection to `key` still open and fresh; None when there is none."""
        kept = self._kept.get(key)
        now = time.monotonic()
        while kept:
            connection = kept.pop()
            if not connection.closed and now - connection.idle_since < self.idle_seconds:
                return connection
            connection.abandon()
        return None

    def give_back(self, connection: C) -> None:
        """Keep a connection whose exchange ended cleanly; close any other."""
        if not connection.reusable:
            connection.abandon()
            return
        kept = self._kept.setdefault(connection.key, [])  # type: ignore[arg-type]
        if len(kept) >= self.per_address:
            connection.abandon()
            return
        connection.idle_since = time.monotonic()
        kept.append(connection)

    def holds(self, key: K) -> int:
        """How many connections to `key` are kept."""
        return len(self._kept.get(key, ()))

    def close(self) -> None:
        for kept in self._kept.values():
            for connection in kept:
                connection.abandon()
        self._kept.clear()


class EngineConnections:
    """The agent's connections to its engines, kept between exchanges (one pool per engine
    address). Owned by the agent's server: closed at shutdown."""

    def __init__(self) -> None:
        self._kept: Kept[tuple[str, int], EngineConnection] = Kept(
            KEEP_IDLE_SECONDS, KEEP_PER_ENGINE
        )

    async def exchange(
        self, host: str, port: int, method: str, path: str, query: str,
        headers: Mapping[str, str], body: bytes,
    ) -> tuple[EngineConnection, Head]:  # fmt: skip
        """Send the request and read the answer's status line and headers. A kept connection
        that the engine closed meanwhile (nothing of an answer received) is retried once on a
        new one: the engine never saw the request."""
        target = quote(path, safe=PATH_SAFE) + (f"?{query}" if query else "")
        connection = await self._take(host, port)
        while True:
            connection.send(method, target, headers, body)
            try:
                return connection, await connection.head()
            except EngineUnreachable:
                if not connection.stale:
                    raise
                connection = await self._take(host, port, fresh=True)
            except BaseException:
                connection.abandon()
                raise

    def give_back(self, connection: EngineConnection) -> None:
        """Keep a connection whose exchange ended cleanly; close any other."""
        self._kept.give_back(connection)

    async def _take(self, host: str, port: int, fresh: bool = False) -> EngineConnection:
        key = (host, port)
        if not fresh and (kept := self._kept.take(key)) is not None:
            return kept
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: EngineConnection(key), host, port),
                CONNECT_SECONDS,
            )
        except (OSError, TimeoutError) as exc:
            raise EngineUnreachable(f"cannot connect to the engine: {exc}") from None
        return protocol

    def close(self) -> None:
        self._kept.close()
