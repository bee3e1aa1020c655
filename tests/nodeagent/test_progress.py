"""The agent's progress reporter: phase changes go out at once, bytes at most every 0.25 s,
newest state only, and a control plane that fails never stops it."""

from __future__ import annotations

import asyncio

from nodeagent.progress import BYTES_INTERVAL, ProgressReporter
from nodeagent.protocol import CacheLevel, ModelState, ModelStatus
from tests.support import until


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
        await until(lambda: sent, 10, "the first report")
        assert [s[0].phase for s in sent] == ["downloading"]
        # Bytes alone: not more often than BYTES_INTERVAL, whatever the pokes.
        loop = asyncio.get_running_loop()
        began = loop.time()
        for done in range(1, 40):
            now[:] = [status(ModelState.DOWNLOADING, "downloading", done)]
            reporter.poke()
            await asyncio.sleep(0.01)
        # The newest is sent in the end, not a queue of old ones.
        await until(lambda: sent[-1][0].bytes_done == 39, 10, "the newest bytes")
        elapsed = loop.time() - began
        assert 2 <= len(sent) <= 2 + elapsed / BYTES_INTERVAL, [s[0].bytes_done for s in sent]
        failing = True
        now[:] = [status(ModelState.LOADING_TO_GPU, "starting the engine (standby)")]
        reporter.poke()
        await until(lambda: reporter.failures == 1, 10, "the failed report")
        failing = False
        now[:] = [status(ModelState.LOADING_TO_GPU, "starting the engine (standby)", 100)]
        await until(
            lambda: sent[-1][0].cache_state == ModelState.LOADING_TO_GPU, 10, "the engine phase"
        )
        count = len(sent)
        now[:] = []  # the load ended: its answer says how; nothing more to send
        await asyncio.sleep(0.3)
        assert len(sent) == count
    finally:
        await reporter.close()
