"""The requests held for one cold start share `ensure_placement`: one call under way, and a
recent answer, per web process, instead of one row lock per waiter every few seconds."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync, sync_to_async

from agents import actions
from agents.choices import PlacementState
from controlplane.gateway import coldstart
from controlplane.gateway.coldstart import Watches, wait_until_ready
from tests.factories import PlacementFactory

pytestmark = pytest.mark.django_db


def test_a_cold_starts_waiters_share_one_ensure_placement(monkeypatch):
    loading = PlacementFactory(state=PlacementState.DOWNLOADING)
    model = loading.model
    asked = []

    def counting(wanted, *how):
        asked.append(wanted.pk)
        return loading

    monkeypatch.setattr(actions, "ensure_placement", counting)
    monkeypatch.setattr(coldstart, "_RECHECK_SECONDS", 0.3)

    async def scenario() -> list[int]:
        watches = Watches()
        waiters = [
            asyncio.ensure_future(wait_until_ready(watches, model, seconds=10)) for _ in range(50)
        ]
        await asyncio.sleep(1.0)  # a few rechecks' worth, the load still under way
        during = len(asked)
        await sync_to_async(
            lambda: type(loading).objects.filter(pk=loading.pk).update(state=PlacementState.READY)
        )()
        served = await asyncio.gather(*waiters)
        assert {placement.pk for placement in served} == {loading.pk}
        return [during]

    (during,) = async_to_sync(scenario)()
    # One call as they arrived, then about one per recheck interval: not 50 per interval.
    assert 1 <= during <= 6, during


def test_a_failed_placement_sends_its_waiters_to_a_fresh_answer(monkeypatch):
    failed = PlacementFactory(state=PlacementState.FAILED)
    ready = PlacementFactory(model=failed.model, state=PlacementState.READY)
    answers = iter([failed, ready])
    monkeypatch.setattr(actions, "ensure_placement", lambda model, *how: next(answers))

    async def scenario() -> int:
        placement = await wait_until_ready(Watches(), failed.model, seconds=5)
        return placement.pk

    assert async_to_sync(scenario)() == ready.pk
