"""Usage, gathered in memory and written in batches, so no request waits on a database write.

Each web process adds a request's tokens to a buffer; a task writes the
buffer every `GATEWAY_USAGE_FLUSH_SECONDS` as one upsert per key and model.
A process that dies loses at most that last interval's counts.
"""

from __future__ import annotations

import asyncio
import logging

from django.conf import settings

from controlplane.gateway.actions import record_usage
from controlplane.gateway.handler import drop_broken_connections
from controlplane.gateway.loops import per_loop

log = logging.getLogger(__name__)


class UsageBuffer:
    def __init__(self) -> None:
        self.pending: dict[tuple[int, int], list[int]] = {}
        self.flusher: asyncio.Task[None] | None = None

    def add(self, key_id: int, model_pk: int, prompt: int, completion: int) -> None:
        counts = self.pending.setdefault((key_id, model_pk), [0, 0, 0])
        counts[0] += 1
        counts[1] += prompt
        counts[2] += completion
        if self.flusher is None or self.flusher.done():
            self.flusher = asyncio.get_running_loop().create_task(self._flush_later())

    async def _flush_later(self) -> None:
        await asyncio.sleep(settings.GATEWAY_USAGE_FLUSH_SECONDS)
        batch, self.pending = self.pending, {}
        await drop_broken_connections()  # the /v1 handler's shared ORM thread (handler.py)
        for (key_id, model_pk), (requests, prompt, completion) in batch.items():
            try:
                await record_usage(key_id, model_pk, prompt, completion, requests=requests)
            except Exception:  # the database is away: keep serving, say so
                log.exception("could not record usage of key %s on model %s", key_id, model_pk)


_buffers: dict[asyncio.AbstractEventLoop, UsageBuffer] = {}


def buffer() -> UsageBuffer:
    """The buffer of the running event loop (daphne runs one)."""
    return per_loop(_buffers, UsageBuffer)
