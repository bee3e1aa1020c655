"""The agent's connections to its engines, kept between exchanges (one pool per engine address).

A connection is kept only once its exchange ended cleanly, and for less than the
engine's own keep-alive; one the engine closed meanwhile (nothing of an answer came
back) is replaced by a new one and the request sent again, the engine never having
seen it. nodeagent.relay runs each exchange.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from urllib.parse import quote

from nodeagent.http1 import Head
from nodeagent.relay import EngineConnection, EngineUnreachable

# How long a kept connection may sit idle before it is used again: under the keep-alive of
# vLLM's server (uvicorn's, 5 s), so that a kept connection is not one the engine is closing.
KEEP_IDLE_SECONDS = 2.0
KEEP_PER_ENGINE = 256
CONNECT_SECONDS = 5.0
_PATH_SAFE = "/:@!$&'()*+,;=-._~"


class EngineConnections:
    """The agent's connections to its engines, kept between exchanges (one pool per engine
    address). Owned by the agent's server: closed at shutdown."""

    def __init__(self) -> None:
        self._kept: dict[tuple[str, int], list[EngineConnection]] = {}

    async def exchange(
        self, host: str, port: int, method: str, path: str, query: str,
        headers: Mapping[str, str], body: bytes,
    ) -> tuple[EngineConnection, Head]:  # fmt: skip
        """Send the request and read the answer's status line and headers. A kept connection
        that the engine closed meanwhile (nothing of an answer received) is retried once on a
        new one: the engine never saw the request."""
        target = quote(path, safe=_PATH_SAFE) + (f"?{query}" if query else "")
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
        if not connection.reusable:
            connection.abandon()
            return
        kept = self._kept.setdefault(connection.key, [])
        if len(kept) >= KEEP_PER_ENGINE:
            connection.abandon()
            return
        connection.idle_since = time.monotonic()
        kept.append(connection)

    async def _take(self, host: str, port: int, fresh: bool = False) -> EngineConnection:
        key = (host, port)
        kept = self._kept.get(key)
        now = time.monotonic()
        while kept and not fresh:
            connection = kept.pop()
            if not connection.closed and now - connection.idle_since < KEEP_IDLE_SECONDS:
                return connection
            connection.abandon()
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
        for kept in self._kept.values():
            for connection in kept:
                connection.abandon()
        self._kept.clear()
