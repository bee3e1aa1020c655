"""The gateway asks for another replica when every one is overloaded, without waiting."""

from __future__ import annotations

import asyncio

import pytest

from controlplane.celery import app
from controlplane.gateway.state import GatewayState
from tests.factories import ModelFactory, PlacementFactory

pytestmark = pytest.mark.django_db


def test_every_replica_over_the_threshold_asks_for_one_more_once(monkeypatch, settings):
    settings.SCALE_OUT_QUEUE_THRESHOLD = 4
    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, args: sent.append((name, args)))
    model = ModelFactory(max_replicas=3)
    placements = [PlacementFactory(model=model) for _ in range(2)]
    state = GatewayState()
    router = state.router

    async def route(in_flight: list[int]) -> None:
        for placement, count in zip(placements, in_flight, strict=True):
            router.in_flight[placement.pk] = count
        router.maybe_scale_out(model, placements)
        await asyncio.gather(*state.background)

    asyncio.run(route([5, 2]))  # one replica has room
    assert sent == []
    asyncio.run(route([5, 4]))
    assert sent == [("agents.tasks.scale_out", (model.pk,))]
    asyncio.run(route([9, 9]))  # asked a moment ago: not again
    assert len(sent) == 1


def test_requests_held_for_a_seat_count_toward_scale_out(monkeypatch, settings):
    """Replicas whose seats are all taken (under the threshold: a small max_num_seqs) with
    requests held for them ask for another replica."""
    settings.SCALE_OUT_QUEUE_THRESHOLD = 8
    sent = []
    monkeypatch.setattr(app, "send_task", lambda name, args: sent.append((name, args)))
    model = ModelFactory(max_replicas=3)
    placements = [PlacementFactory(model=model, max_num_seqs=4) for _ in range(2)]
    state = GatewayState()
    router = state.router
    queue = state.admission.queue(model.pk, model.model_id)

    async def route(held: int) -> None:
        for placement in placements:
            router.in_flight[placement.pk] = 4
        queue.queued = held
        router.maybe_scale_out(model, placements)
        await asyncio.gather(*state.background)

    asyncio.run(route(0))  # full, nobody waiting: the seats are enough
    assert sent == []
    asyncio.run(route(8))  # 4 held per replica on top of 4 each
    assert sent == [("agents.tasks.scale_out", (model.pk,))]
