"""Counts gathered in memory per web process and written in batches, off the request's path.

A request adds to a key's counts; the first addition of an interval schedules one
task that writes every key's counts `GATEWAY_USAGE_FLUSH_SECONDS` later, each with
one upsert. A key whose write fails (the database is away) keeps its counts for the
next flush, added to whatever came since; past `GATEWAY_USAGE_BACKLOG` keys the
oldest are dropped, counted in `llmfleet_usage_dropped_total` and logged. A process
that dies loses at most what it had not written yet.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Hashable
from typing import Generic, TypeVar

from django.conf import settings

from controlplane import metrics
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
        await self.flush()

    async def flush(self) -> None:
        """Write every key's counts; those that fail wait for the next flush."""
        batch, self.pending = self.pending, {}
        await drop_broken_connections()  # the /v1 handler's shared ORM thread (handler.py)
        failed: dict[K, list[float]] = {}
        for key, counts in batch.items():
            if failed:  # the database is away: do not wait out a timeout per key
                failed[key] = counts
                continue
            try:
                await self.write(key, counts)
            except Exception as exc:  # keep serving; keep the counts; say so
                log.warning("could not write %s for %s (kept for the next flush): %s",
                            self.what, key, exc)  # fmt: skip
                failed[key] = counts
        if failed:
            self._keep(failed)

    def _keep(self, failed: dict[K, list[float]]) -> None:
        """Put unwritten counts back in front of what came meanwhile, within the backlog."""
        merged = failed
        for key, counts in self.pending.items():
            kept = merged.setdefault(key, [0] * self.width)
            for index, count in enumerate(counts):
                kept[index] += count
        excess = len(merged) - settings.GATEWAY_USAGE_BACKLOG
        if excess > 0:
            for key in list(merged)[:excess]:  # the oldest: dicts keep insertion order
                del merged[key]
            metrics.USAGE_DROPPED.labels(self.what).inc(excess)
            log.error("dropped %d unwritten %s: the database has been away too long",
                      excess, self.what)  # fmt: skip
        self.pending = merged
        if self.flusher is None or self.flusher.done() or self.flusher is asyncio.current_task():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_later())
