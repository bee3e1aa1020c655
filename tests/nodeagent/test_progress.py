"""The agent's progress reporter: phase changes go out at once, bytes at most every 0.25 s,
newest state only, and a control plane that fails never stops it."""

from __future__ import annotations

import asyncio

from nodeagent.progress import BYTES_INTERVAL, ProgressReporter
from nodeagent.protocol import CacheLevel, ModelState, ModelStatus


def status(state: ModelState, phase: str, done: int = 0) -> ModelStatus:
    return ModelStatus(model_id="org/m", cache_state=state, cache_level=CacheLevel.NONE,
                       bytes_done=done, bytes_total=100, phase=phase)  # fmt: skip


async def test_phases_at_once_bytes_throttled_and_failures_survived():
    now: list[ModelStatus] = []
    sent: list[list[ModelStatus]] = []
    failing = False

    async def send(statuses):
        if failing:
            raise ConnectionError("control plane down")
        sent.append(list(statuses))

    reporter = ProgressReporter(lambda: now, send)
    reporter.start()
    try:
        now[:] = [status(ModelState.DOWNLOADING, "downloading", 0)]
        reporter.poke()
        await asyncio.sleep(0.05)
        assert [s[0].phase for s in sent] == ["downloading"]
        # Bytes alone: not more often than BYTES_INTERVAL, whatever the pokes.
        for done in range(1, 40):
            now[:] = [status(ModelState.DOWNLOADING, "downloading", done)]
            reporter.poke()
            await asyncio.sleep(0.01)
        await asyncio.sleep(BYTES_INTERVAL)
        assert 2 <= len(sent) <= 4, [s[0].bytes_done for s in sent]
        assert sent[-1][0].bytes_done == 39  # the newest, not a queue of old ones
        failing = True
        now[:] = [status(ModelState.LOADING_TO_GPU, "starting the engine (standby)")]
        reporter.poke()
        await asyncio.sleep(0.05)
        assert reporter.failures == 1
        failing = False
        now[:] = [status(ModelState.LOADING_TO_GPU, "starting the engine (standby)", 100)]
        await asyncio.sleep(BYTES_INTERVAL + 0.2)
        assert sent[-1][0].cache_state == ModelState.LOADING_TO_GPU
        count = len(sent)
        now[:] = []  # the load ended: its answer says how; nothing more to send
        await asyncio.sleep(0.3)
        assert len(sent) == count
    finally:
        await reporter.close()
