"""Load progress pushed to the control plane as it happens, not at the next heartbeat.

Heartbeats come every few seconds, and a cold start's phases can be shorter than one:
a download of a small model takes milliseconds, a standby's engine start two seconds.
The reporter sends `POST /api/agents/<id>/progress` with the loading models' statuses
whenever a phase changes (at once, unless a report went out less than `MIN_INTERVAL`
ago) or bytes arrive (at most every `BYTES_INTERVAL`),
so waiting clients and the dashboard follow each phase within a fraction of a second.
One task sends, one report at a time, newest state only: a slow control plane gets
fewer reports, never a queue of stale ones. A report that fails is not retried: the
next change or heartbeat says the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence

from nodeagent.protocol import ModelStatus

log = logging.getLogger(__name__)

BYTES_INTERVAL = 0.25
# Between two reports at least this long, phase changes included: a fleet's loads started
# together (a burst of cold requests) make one report per interval, not one per change,
# and a phase still reaches the control plane well within half a second.
MIN_INTERVAL = 0.2
# How often a running download is looked at, between pokes.
_TICK = 0.1

Snapshot = Callable[[], Sequence[ModelStatus]]
Send = Callable[[Sequence[ModelStatus]], Awaitable[None]]


def _phase_key(status: ModelStatus) -> tuple[str, str, str]:
    return (status.model_id, status.cache_state, status.phase)


class ProgressReporter:
    def __init__(self, snapshot: Snapshot, send: Send) -> None:
        self.snapshot = snapshot
        self.send = send
        self.sent = 0
        self.failures = 0
        self._poked = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._last: dict[str, ModelStatus] = {}
        self._last_sent_at = 0.0

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    def poke(self) -> None:
        """A phase changed: report it now."""
        self._poked.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._poked.wait(), _TICK)
            self._poked.clear()
            statuses = list(self.snapshot())
            if self._due(statuses):
                await self._report(statuses)

    def _due(self, statuses: Sequence[ModelStatus]) -> bool:
        if time.monotonic() - self._last_sent_at < MIN_INTERVAL:
            return False
        now = {status.model_id: status for status in statuses}
        if set(now) != set(self._last):
            return bool(now) or bool(self._last)
        for model_id, status in now.items():
            before = self._last[model_id]
            if _phase_key(status) != _phase_key(before):
                return True
            if status.bytes_done != before.bytes_done:
                return time.monotonic() - self._last_sent_at >= BYTES_INTERVAL
        return False

    async def _report(self, statuses: Sequence[ModelStatus]) -> None:
        self._last = {status.model_id: status for status in statuses}
        self._last_sent_at = time.monotonic()
        if not statuses:
            return  # loads that ended: their answers say so
        try:
            await self.send(statuses)
            self.sent += 1
        except Exception as exc:
            self.failures += 1
            log.debug("progress report not delivered: %s", exc)
