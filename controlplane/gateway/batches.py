"""Counts gathered in memory per web process and written in batches, off the request's path.

A request adds to a key's counts; the first addition of an interval schedules one
task that writes every key's counts `GATEWAY_USAGE_FLUSH_SECONDS` later, each with
one upsert. A process that dies loses at most that interval's counts.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Generic, TypeVar

from django.conf import settings

from controlplane.gateway.handler import drop_broken_connections

log = logging.getLogger(__name__)
K = TypeVar("K", bound=Hashable)


class Batches(Generic[K]):
    """Subclasses say how wide a key's counts are and how a key's counts are written."""

    width = 1
    what = "counts"

    def __init__(self) -> None:
        self.pending: dict[K, list[float]] = {}
        self.flusher: asyncio.Task[None] | None = None

    def counts(self, key: K) -> list[float]:
        """The key's counts of this interval, to add to."""
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_later())
        return self.pending.setdefault(key, [0] * self.width)

    async def write(self, key: K, counts: list[float]) -> None:
        raise NotImplementedError

    async def _flush_later(self) -> None:
        await asyncio.sleep(settings.GATEWAY_USAGE_FLUSH_SECONDS)
        batch, self.pending = self.pending, {}
        await drop_broken_connections()  # the /v1 handler's shared ORM thread (handler.py)
        for key, counts in batch.items():
            try:
                await self.write(key, counts)
            except Exception:  # the database is away: keep serving, say so
                log.exception("could not write %s for %s", self.what, key)
