"""Admission's queue on its own: seats, fair shares by weight, classes, deadlines, bounds, work
conservation and the reserved seats (controlplane.gateway.admission)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from agents.scheduling import lifted_counter, may_start, next_in_line, replica_seats
from controlplane import metrics
from controlplane.gateway.admission import Admission, Asker, ModelQueue, Shed, Ticket, Waiter


@pytest.fixture(autouse=True)
def bounds(settings: Any) -> None:
    settings.GATEWAY_RESERVED_SEATS = 0
    settings.GATEWAY_QUEUE_MAX = 1000
    settings.GATEWAY_QUEUE_MAX_PER_KEY = 1000


def asker(key: int, weight: int = 1, cls: str = "interactive", prompt: int = 10) -> Asker:
    return Asker(key, f"key-{key}", weight, cls, prompt)


def test_decisions():
    assert replica_seats(8, 1.0, 256) == 8
    assert replica_seats(0, 1.0, 256) == 256  # the agent did not say
    assert replica_seats(8, 1.5, 256) == 12
    assert replica_seats(1, 0.1, 256) == 1  # never none
    assert may_start(3, 4, key_in_flight=3, reserve=0)
    assert not may_start(4, 4, key_in_flight=0, reserve=0)
    assert not may_start(3, 4, key_in_flight=3, reserve=1)  # the last seat is kept...
    assert may_start(3, 4, key_in_flight=0, reserve=1)  # ...for a key that holds none
    assert lifted_counter(5.0, [20.0, 30.0], 0.0) == 20.0  # no credit banked while idle
    assert lifted_counter(50.0, [20.0], 0.0) == 50.0
    assert lifted_counter(0.0, [], 12.0) == 12.0
    order = next_in_line({"batch": [1], "interactive": [2, 3]}, {1: 0.0, 2: 9.0, 3: 4.0})
    assert order == [("interactive", 3), ("interactive", 2), ("batch", 1)]


def run(scenario: Any) -> Any:
    return asyncio.run(scenario())


def test_free_seats_are_taken_at_once_and_the_rest_wait():
    async def scenario() -> None:
        admission, queue = Admission(), ModelQueue("m")
        tickets = [admission.enter(queue, asker(1), capacity=2) for _ in range(2)]
        assert all(isinstance(t, Ticket) for t in tickets)
        held = admission.enter(queue, asker(1), capacity=2)
        assert isinstance(held, Waiter)
        assert queue.queued == 1
        assert isinstance(tickets[0], Ticket)
        tickets[0].release()  # a seat frees: the waiter has it
        seated = await admission.wait(queue, held, 1.0)
        assert isinstance(seated, Ticket)
        assert (queue.in_flight, queue.queued) == (2, 0)
        tickets[0].release()  # once only
        assert queue.in_flight == 2

    run(scenario)


def test_fair_shares_follow_the_keys_weights_not_their_request_counts():
    async def scenario() -> Counter[int]:
        admission, queue = Admission(), ModelQueue("m")
        tickets: list[Ticket] = []
        for _ in range(4):  # key 1 holds every seat, then both keep 50 requests waiting
            ticket = admission.enter(queue, asker(1), capacity=4)
            assert isinstance(ticket, Ticket)
            tickets.append(ticket)
        entered = [admission.enter(queue, asker(1), 4) for _ in range(50)]
        entered += [admission.enter(queue, asker(2, weight=2), 4) for _ in range(50)]
        waiters = [waiter for waiter in entered if isinstance(waiter, Waiter)]
        assert len(waiters) == 100
        served: Counter[int] = Counter()
        seated: set[int] = set()
        for _ in range(60):  # each request is served 100 tokens, then frees its seat
            ticket = tickets.pop(0)
            ticket.served(100)
            ticket.release()
            for waiter in waiters:
                if waiter.seat.done() and id(waiter) not in seated:
                    seated.add(id(waiter))
                    tickets.append(waiter.seat.result())
                    served[waiter.asker.key] += 1
        return served

    served = run(scenario)
    assert sum(served.values()) == 60
    # Weight 2 is served twice the tokens of weight 1 (within one request either way).
    assert abs(served[2] - 2 * served[1]) <= 3, served


def test_interactive_requests_go_before_batch_ones_whatever_the_counters():
    async def scenario() -> None:
        admission, queue = Admission(), ModelQueue("m")
        ticket = admission.enter(queue, asker(1, prompt=10_000), capacity=1)
        assert isinstance(ticket, Ticket)
        batch = admission.enter(queue, asker(2, cls="batch", prompt=1), 1)
        interactive = admission.enter(queue, asker(1, prompt=10_000), 1)  # the most served key
        assert isinstance(batch, Waiter)
        assert isinstance(interactive, Waiter)
        ticket.release()
        assert interactive.seat.done()
        assert not batch.seat.done()
        interactive.seat.result().release()
        assert batch.seat.done()
        # A batch request finds no seat while an interactive one waits, even with one free.
        queue.capacity = 2
        held = admission.enter(queue, asker(3), 1)
        assert isinstance(held, Waiter)
        assert isinstance(admission.enter(queue, asker(4, cls="batch"), 1), Waiter)

    run(scenario)


def test_a_request_past_its_deadline_leaves_the_line_and_is_never_seated():
    async def scenario() -> None:
        admission, queue = Admission(), ModelQueue("m")
        gauge = metrics.QUEUED.labels("m", "key-2", "interactive")
        before = gauge._value.get()
        ticket = admission.enter(queue, asker(1), capacity=1)
        held = admission.enter(queue, asker(2), 1)
        assert isinstance(ticket, Ticket)
        assert isinstance(held, Waiter)
        assert gauge._value.get() == before + 1
        shed = await admission.wait(queue, held, 0.05)
        assert isinstance(shed, Shed)
        assert (shed.status, shed.code) == (503, "queue_timeout")
        assert (queue.queued, gauge._value.get()) == (0, before)
        ticket.release()
        assert queue.in_flight == 0  # nobody took the seat: the timed-out request is gone

    run(scenario)


def test_bounds_refuse_at_once_with_queue_full(settings):
    settings.GATEWAY_QUEUE_MAX_PER_KEY = 2
    settings.GATEWAY_QUEUE_MAX = 3

    async def scenario() -> None:
        admission, queue = Admission(), ModelQueue("m")
        assert isinstance(admission.enter(queue, asker(1), capacity=1), Ticket)
        assert isinstance(admission.enter(queue, asker(1), 1), Waiter)
        assert isinstance(admission.enter(queue, asker(1), 1), Waiter)
        per_key = admission.enter(queue, asker(1), 1)
        assert isinstance(per_key, Shed)
        assert per_key.reason == "key_queue_full"
        assert (per_key.status, per_key.code) == (429, "queue_full")
        assert isinstance(admission.enter(queue, asker(2), 1), Waiter)
        whole = admission.enter(queue, asker(3), 1)
        assert isinstance(whole, Shed)
        assert whole.reason == "queue_full"

    run(scenario)


def test_one_key_alone_gets_every_seat_but_the_reserved_and_a_light_key_the_rest(settings):
    async def scenario(reserve: int) -> tuple[int, object]:
        settings.GATEWAY_RESERVED_SEATS = reserve
        admission, queue = Admission(), ModelQueue("m")
        taken = 0
        while isinstance(admission.enter(queue, asker(1), capacity=16), Ticket):
            taken += 1
        return taken, admission.enter(queue, asker(2), capacity=16)

    assert asyncio.run(scenario(0))[0] == 16  # work-conserving
    taken, light = asyncio.run(scenario(1))
    assert taken == 15
    assert isinstance(light, Ticket)  # the flood's neighbour starts at once


def test_a_key_back_from_idle_banks_no_credit():
    async def scenario() -> None:
        admission, queue = Admission(), ModelQueue("m")
        first = admission.enter(queue, asker(1, prompt=1000), capacity=1)
        assert isinstance(first, Ticket)
        waiting = admission.enter(queue, asker(1, prompt=1000), 1)
        assert isinstance(waiting, Waiter)
        newcomer = admission.enter(queue, asker(2, prompt=1), 1)  # never served before
        assert isinstance(newcomer, Waiter)
        # It joined at the least counter among those waiting, not at zero.
        assert queue.counters[2] == queue.counters[1]

    run(scenario)


def test_a_waiter_whose_client_leaves_gives_its_place_or_seat_back():
    async def scenario() -> None:
        admission, queue = Admission(), ModelQueue("m")
        ticket = admission.enter(queue, asker(1), capacity=1)
        assert isinstance(ticket, Ticket)
        held = admission.enter(queue, asker(2), 1)
        assert isinstance(held, Waiter)
        waiting = asyncio.ensure_future(admission.wait(queue, held, 10))
        await asyncio.sleep(0)
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert queue.queued == 0
        # Seated as it leaves: the seat goes back.
        held = admission.enter(queue, asker(2), 1)
        assert isinstance(held, Waiter)
        waiting = asyncio.ensure_future(admission.wait(queue, held, 10))
        await asyncio.sleep(0)
        ticket.release()  # seats the waiter...
        waiting.cancel()  # ...whose client is gone before it ran
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert queue.in_flight == 0

    run(scenario)


def test_cold_waiters_are_bounded_per_model(settings):
    settings.GATEWAY_COLD_QUEUE_MAX = 2
    admission = Admission()
    assert admission.enter_cold(1, "m") is None
    assert admission.enter_cold(1, "m") is None
    refused = admission.enter_cold(1, "m")
    assert isinstance(refused, Shed)
    assert refused.reason == "cold_queue_full"
    assert admission.enter_cold(2, "other") is None
    admission.leave_cold(1)
    assert admission.enter_cold(1, "m") is None


def test_a_held_stream_sends_nothing_until_a_keep_alive_is_due(monkeypatch):
    """Its head goes at once; a comment only once the keep-alive interval passed. A lone
    comment breaks clients that take each read for whole events (vLLM's load generator
    strips every read, and after a comment never finds an event's end again)."""
    from types import SimpleNamespace

    from controlplane.gateway import router
    from controlplane.gateway.job import Cleanup
    from controlplane.gateway.state import GatewayState

    monkeypatch.setattr(router, "KEEPALIVE_SECONDS", 0.3)

    async def scenario() -> None:
        state = GatewayState()
        queue = ModelQueue("org/tiny")
        assert isinstance(state.admission.enter(queue, asker(1), capacity=1), Ticket)
        held = state.admission.enter(queue, asker(1), capacity=1)
        assert isinstance(held, Waiter)
        job = SimpleNamespace(target=SimpleNamespace(model_id="org/tiny"), queue_timeout=30.0)
        stream = state.router._held_stream(job, queue, held, Cleanup())  # type: ignore[arg-type]
        assert await anext(stream) == b""  # the head goes: under daphne, with a body write
        began = time.monotonic()
        first = await anext(stream)
        assert time.monotonic() - began >= 0.29  # nothing before the keep-alive was due
        assert first == b": queued for org/tiny\n\n"
        await stream.aclose()  # type: ignore[attr-defined]  # the client left
        await asyncio.sleep(0)
        assert queue.queued == 0  # its place went back

    run(scenario)
