"""The standby pool's own life: filling, giving away, replacing the dead, stopping everything.

These run `standby_main.py` with this interpreter, which has no vLLM: its imports are
skipped in a moment and it says it is ready, so the pool is exercised for real in under a
second per standby. tests/e2e/test_standby_vllm.py does the same with vLLM.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from nodeagent.engines.standby import StandbyPool, max_num_seqs, standby_refusal
from tests.e2e.agent_process import group_members
from tests.support import until


def _pool(tmp_path: Path, size: int = 1, python: str = sys.executable) -> tuple[StandbyPool, list]:
    deaths: list[None] = []
    pool = StandbyPool(
        python=python, size=size, log_path=tmp_path / "standby.log",
        environ=dict(os.environ), on_death=lambda: deaths.append(None),
    )  # fmt: skip
    return pool, deaths


async def test_the_pool_fills_gives_one_away_and_replaces_it_only_when_asked(tmp_path):
    pool, _ = _pool(tmp_path)
    pool.start()
    try:
        # Asked while the first one still imports: the load waits for it.
        standby = await pool.take(within=20)
        assert standby is not None
        assert standby.process.returncode is None
        assert pool.take_ready() is None
        assert await pool.take(within=5) is None  # none starting: nothing to wait for
        assert pool.why_none() == "no standby was ready (all taken)"
        await asyncio.sleep(0.3)
        # Its successor waits until the engine it became has started: the CPU is the start's.
        assert pool.counts == {"ready": 0, "starting": 0}
        pool.replenish()
        await until(lambda: pool.counts["ready"] == 1, 20, "a ready standby")
        assert pool.ready[0].pid != standby.pid
    finally:
        await pool.close()
    # The one given away is the caller's: it lives until the caller stops it.
    assert standby.process.returncode is None
    standby.process.stdin.close()
    assert await asyncio.wait_for(standby.process.wait(), 10) == 0


async def test_a_standby_killed_with_sigkill_is_replaced(tmp_path):
    pool, deaths = _pool(tmp_path)
    pool.start()
    try:
        await until(lambda: pool.counts["ready"] == 1, 20, "a ready standby")
        victim = pool.ready[0].pid
        os.kill(victim, signal.SIGKILL)
        await until(
            lambda: pool.counts["ready"] == 1 and pool.ready[0].pid != victim, 20, "a replacement"
        )
        assert len(deaths) == 1
        assert pool.take_ready() is not None
    finally:
        await pool.close()


async def test_closing_the_pool_leaves_no_process_of_any_standby(tmp_path):
    pool, _ = _pool(tmp_path, size=2)
    pool.start()
    await until(lambda: pool.counts["ready"] == 2, 20, "two ready standbys")
    pids = [standby.pid for standby in pool.ready]
    await pool.close()
    for pid in pids:
        assert group_members(pid) == []
    assert pool.counts == {"ready": 0, "starting": 0}


async def test_a_standby_that_cannot_start_is_retried_with_backoff_and_says_why(tmp_path):
    pool, deaths = _pool(tmp_path, python="/bin/false")
    pool.start()
    try:
        await until(lambda: len(deaths) >= 2, 20, "two failed starts")
        assert pool.take_ready() is None
        assert "a standby did not start: it exited with status 1" in pool.why_none()
        assert pool.counts["ready"] == 0
    finally:
        await pool.close()


@pytest.mark.parametrize(
    ("args", "refusal"),
    [
        ([], None),
        (["--max-model-len", "512", "--enforce-eager"], None),
        (["--tensor-parallel-size", "1", "-pp", "1"], None),
        (["--distributed-executor-backend", "mp"], None),
        (["--tensor-parallel-size", "2"], "--tensor-parallel-size 2 (tensor parallelism)"),
        (["-tp=4"], "-tp 4 (tensor parallelism)"),
        (["--pipeline-parallel-size", "2"], "--pipeline-parallel-size 2 (pipeline parallelism)"),
        (["--data-parallel-size", "2"], "--data-parallel-size 2 (data parallelism)"),
        (["--distributed-executor-backend=ray"], "--distributed-executor-backend ray"),
        (["--numa-bind"], "--numa-bind"),
        (["--api-server-count", "2"], "--api-server-count 2"),
    ],
)
def test_which_engine_arguments_a_standby_cannot_take(args, refusal):
    found = standby_refusal(args)
    if refusal is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(refusal)


def test_an_engines_max_num_seqs_is_read_from_its_arguments():
    """What the agent reports as the replica's seats (controlplane.gateway.admission)."""
    assert max_num_seqs(["--max-num-seqs", "48"], gpu=True) == 48
    assert max_num_seqs(["--max-num-seqs=12"], gpu=False) == 12
    assert max_num_seqs([], gpu=False) == 128  # vLLM's default for its API server on the CPU
    assert max_num_seqs([], gpu=True) == 0  # on a GPU it depends on the card: unknown
    assert max_num_seqs(["--max-num-seqs", "many"], gpu=True) == 0
