"""Batch-class requests yield to all others on each engine (nodeagent.batchgate)."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp.test_utils import TestServer

from nodeagent.batchgate import UNKNOWN_MAX_NUM_SEQS, BatchGate, EngineBusy, batch_seats
from nodeagent.protocol import AGENT_ERROR_HEADER, BATCH_CLASS, PRIORITY_CLASS_HEADER
from tests.nodeagent.conftest import TOKEN, RunningAgent, load_body, sim_args, start_agent
from tests.support import until


@pytest.mark.parametrize(
    ("max_num_seqs", "percent", "seats"),
    [
        (128, 10, 115),  # 12.8 seats kept: 13
        (8, 10, 7),  # at least one kept when any percent is
        (8, 0, 8),
        (1, 10, 1),  # at least one left, or a batch would never run
        (0, 10, UNKNOWN_MAX_NUM_SEQS - 26),  # unknown: vLLM's smaller GPU default
    ],
)
def test_batch_seats_keep_a_reserve(max_num_seqs: int, percent: float, seats: int) -> None:
    assert batch_seats(max_num_seqs, percent) == seats


async def test_batch_requests_enter_while_there_is_room_and_then_in_turn() -> None:
    gate = BatchGate()
    await gate.enter_batch(2, 1)
    gate.enter_now()  # others enter whatever the engine holds
    gate.enter_now()
    assert gate.held == 3
    first = asyncio.ensure_future(gate.enter_batch(2, 5))
    second = asyncio.ensure_future(gate.enter_batch(2, 5))
    await asyncio.sleep(0.01)
    assert not first.done()
    assert not second.done()
    gate.leave(2)  # 2 held: still no room
    await asyncio.sleep(0.01)
    assert not first.done()
    gate.leave(2)  # 1 held: the first in line enters, counted at once
    await asyncio.sleep(0.01)
    assert first.done()
    assert not second.done()
    assert gate.held == 2
    gate.leave(2)
    gate.leave(2)
    await second
    assert gate.held == 1
    assert not gate.waiting


async def test_a_batch_request_that_waits_past_its_bound_is_refused_and_leaves_the_line() -> None:
    gate = BatchGate()
    gate.enter_now()
    with pytest.raises(EngineBusy):
        await gate.enter_batch(1, 0.05)
    assert not gate.waiting
    assert gate.held == 1
    waiter = asyncio.ensure_future(gate.enter_batch(1, 5))
    await asyncio.sleep(0.01)
    waiter.cancel()  # its client left
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert not gate.waiting
    gate.leave(1)
    assert gate.held == 0


async def test_a_turn_that_came_as_its_waiter_left_is_given_on() -> None:
    gate = BatchGate()
    gate.enter_now()
    leaving = asyncio.ensure_future(gate.enter_batch(1, 5))
    next_one = asyncio.ensure_future(gate.enter_batch(1, 5))
    await asyncio.sleep(0.01)
    gate.leave(1)  # `leaving` is let in (counted) ...
    leaving.cancel()  # ... and cancelled before it ran again
    try:
        await leaving
    except asyncio.CancelledError:
        pass  # its place was given on
    else:  # Python 3.11's wait_for keeps a result that came first: in, it leaves as usual
        gate.leave(1)
    await asyncio.wait_for(next_one, 1)  # either way the next in line enters
    assert gate.held == 1


async def test_a_request_counts_its_sequences_and_the_line_keeps_its_order() -> None:
    gate = BatchGate()
    gate.enter_now(3)  # n=3: three of the engine's seats
    wide = asyncio.ensure_future(gate.enter_batch(4, 5, 2))
    narrow = asyncio.ensure_future(gate.enter_batch(4, 5, 1))
    await asyncio.sleep(0.01)
    assert not wide.done()
    assert not narrow.done()  # room for it, but it does not overtake the first in line
    gate.leave(4, 3)
    await asyncio.gather(wide, narrow)
    assert gate.held == 3
    gate.leave(4, 2)
    gate.leave(4, 1)
    await gate.enter_batch(4, 1, 9)  # wider than the engine: it enters alone
    assert gate.held == 9


async def test_a_waiter_that_leaves_the_head_of_the_line_lets_the_next_in() -> None:
    gate = BatchGate()
    gate.enter_now(3)
    wide = asyncio.ensure_future(gate.enter_batch(4, 5, 2))
    narrow = asyncio.ensure_future(gate.enter_batch(4, 5, 1))
    await asyncio.sleep(0.01)
    wide.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wide
    await asyncio.wait_for(narrow, 1)  # it fits once the wide one is out of its way
    assert gate.held == 4


async def _agent(tmp_path, *extra: str) -> tuple[RunningAgent, TestServer]:
    from aiohttp import ClientSession

    server, test_server, url = await start_agent(
        sim_args(tmp_path / "cache", "--sim-max-num-seqs", "4", *extra)
    )
    http = ClientSession()
    return RunningAgent(server, url, http, {"Authorization": f"Bearer {TOKEN}"}), test_server


async def test_the_agent_keeps_its_reserve_free_of_batch_requests(tmp_path, tiny_model) -> None:
    agent, test_server = await _agent(tmp_path, "--batch-reserve-percent", "50")
    try:
        await agent.post("/load_model", load_body(tiny_model))
        slot = agent.server.registry.slots["org/tiny"]
        url = f"{agent.url}/models/org/tiny/v1/completions"
        body = {"model": "org/tiny", "prompt": "hi", "max_tokens": 300}  # about 0.3 s
        batch = {**agent.headers, PRIORITY_CLASS_HEADER: BATCH_CLASS}

        async def complete(headers: dict[str, str]) -> int:
            async with agent.http.post(url, json=body, headers=headers) as response:
                await response.read()
                return response.status

        lines = [asyncio.ensure_future(complete(batch)) for _ in range(3)]
        await until(lambda: slot.in_flight == 2, 5, "two batch requests on the engine")
        await asyncio.sleep(0.05)
        assert slot.in_flight == 2  # the third waits: 2 of the engine's 4 seats are kept
        interactive = asyncio.ensure_future(complete(agent.headers))
        await until(lambda: slot.in_flight == 3, 5, "the interactive request, let in at once")
        assert await asyncio.gather(*lines, interactive) == [200] * 4
        assert agent.server.metrics.batch_requests_waiting._value.get() == 0
    finally:
        await agent.http.close()
        await test_server.close()


async def test_a_batch_request_without_room_in_time_is_503_engine_busy(tmp_path, tiny_model):
    agent, test_server = await _agent(
        tmp_path, "--batch-reserve-percent", "75", "--batch-wait-seconds", "0.2"
    )
    try:
        await agent.post("/load_model", load_body(tiny_model))
        url = f"{agent.url}/models/org/tiny/v1/completions"
        long = {"model": "org/tiny", "prompt": "hi", "max_tokens": 600}
        batch = {**agent.headers, PRIORITY_CLASS_HEADER: BATCH_CLASS}
        held = asyncio.ensure_future(agent.http.post(url, json=long, headers=agent.headers))
        slot = agent.server.registry.slots["org/tiny"]
        await until(lambda: slot.in_flight == 1, 5, "an interactive request on the engine")
        async with agent.http.post(url, json=long, headers=batch) as response:
            assert response.status == 503
            assert response.headers[AGENT_ERROR_HEADER] == "engine_busy"
            assert "no room for a batch request" in (await response.json())["error"]["message"]
        (await held).close()
    finally:
        await agent.http.close()
        await test_server.close()
