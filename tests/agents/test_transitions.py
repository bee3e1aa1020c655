"""One transition table for placements, enforced where rows are written."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
from django.utils import timezone

from agents import actions, transitions
from agents.actions import steps
from agents.choices import CacheLevel, LoadEventKind, LoadOutcome, LoadTrigger, PlacementState
from agents.models import LoadEvent, Placement
from agents.transitions import Event, IllegalTransition
from nodeagent.protocol import LoadModelResponse, LoadTimings, UnloadModelResponse
from tests.factories import AgentFactory, LoadEventFactory, ModelFactory, PlacementFactory

S = PlacementState


@pytest.fixture
def queued(monkeypatch):
    sent: list[tuple[str, tuple[object, ...]]] = []
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: sent.append((name, args)))
    return sent


@pytest.mark.parametrize(
    ("current", "event", "to"),
    [
        (S.READY, Event.LOAD_REQUESTED, S.DOWNLOADING),  # it serves already
        (S.UNLOADING, Event.LOAD_REQUESTED, S.LOADING_TO_GPU),  # wait for the step down
        (S.UNLOADED, Event.ENGINE_READY, S.READY),  # no load was under way
        (S.DOWNLOADING, Event.UNLOAD_REQUESTED, S.UNLOADING),  # a load is under way
        (S.READY, Event.UNLOAD_DONE, S.UNLOADED),  # no unload was under way
        (S.READY, Event.EXPIRED, S.FAILED),  # nothing to expire
        (S.LOADING_TO_GPU, Event.REPORTED, S.UNLOADED),  # the agent has not started it yet
        (S.UNLOADING, Event.REPORTED, S.READY),  # a step down under way ends by its task
        (S.UNLOADED, Event.LOAD_REQUESTED, S.READY),  # a load starts loading, never ready
    ],
)
def test_an_illegal_transition_raises_and_changes_nothing(current, event, to):
    placement = Placement(state=current)
    with pytest.raises(IllegalTransition):
        transitions.move(placement, event, to)
    assert placement.state == current


@pytest.mark.parametrize(
    ("current", "event", "to"),
    [
        (S.UNLOADED, Event.LOAD_REQUESTED, S.DOWNLOADING),
        (S.FAILED, Event.LOAD_REQUESTED, S.LOADING_TO_GPU),
        (S.DOWNLOADING, Event.DOWNLOAD_DONE, S.LOADING_TO_GPU),
        (S.LOADING_TO_GPU, Event.ENGINE_READY, S.READY),
        (S.READY, Event.FAILED, S.FAILED),
        (S.READY, Event.UNLOAD_REQUESTED, S.UNLOADING),
        (S.UNLOADING, Event.UNLOAD_DONE, S.UNLOADED),
        (S.UNLOADING, Event.UNLOAD_REFUSED, S.UNLOADED),
        (S.DOWNLOADING, Event.EXPIRED, S.FAILED),
        (S.UNLOADING, Event.EXPIRED, S.READY),
        (S.READY, Event.AGENT_LOST, S.UNLOADED),
        (S.DOWNLOADING, Event.REPORTED, S.READY),
        (S.READY, Event.REPORTED, S.FAILED),
    ],
)
def test_the_lifecycle_moves_the_table_allows(current, event, to):
    placement = Placement(state=current)
    assert transitions.move(placement, event, to) == to == placement.state


def test_every_state_write_in_the_actions_goes_through_the_table():
    """A transition written by hand in eight places is eight places to get it wrong."""
    folder = Path(actions.__file__).parent
    source = "".join(path.read_text() for path in folder.glob("*.py"))
    assert "transitions.move(" in source, "the walk went stale"
    by_hand = re.findall(r"\b(?!agent\b)\w+\.state(?:, [\w.]+)* = ", source)
    assert by_hand == []
    assert re.findall(r"\bagent\.state = ", source), "the pattern went stale"


@pytest.mark.django_db
def test_an_unload_whose_worker_died_expires_and_the_placement_returns(queued, settings):
    asleep = PlacementFactory(state=S.UNLOADED, cache_level=CacheLevel.DRAM_CACHED)
    event = actions.unload(asleep, CacheLevel.NVME_CACHED, LoadTrigger.OPERATOR)
    actions.begin_unload(event.pk)  # the worker took it, then died
    long_ago = timezone.now() - timedelta(seconds=actions.UNLOAD_TIMEOUT_SECONDS + 120)
    LoadEvent.objects.filter(pk=event.pk).update(queued_at=long_ago)
    actions.sweep()
    asleep.refresh_from_db()
    event.refresh_from_db()
    assert event.outcome == LoadOutcome.FAILED
    # Back where it was: asleep in host RAM, not READY (it never was on the GPU).
    assert (asleep.state, asleep.cache_level) == (S.UNLOADED, CacheLevel.DRAM_CACHED)


@pytest.mark.django_db
def test_a_placement_left_mid_step_with_no_step_pending_expires(queued, settings):
    long_ago = timezone.now() - timedelta(seconds=settings.COLD_START_TIMEOUT_SECONDS + 120)
    loading = PlacementFactory(state=S.LOADING_TO_GPU, cache_level=CacheLevel.NVME_CACHED)
    leaving = PlacementFactory(state=S.UNLOADING)
    recent = PlacementFactory(state=S.DOWNLOADING, cache_level=CacheLevel.NONE)
    Placement.objects.filter(pk__in=[loading.pk, leaving.pk]).update(updated_at=long_ago)
    assert actions.sweeps.expire_stuck_placements() == 2
    for placement in (loading, leaving, recent):
        placement.refresh_from_db()
    assert loading.state == S.FAILED
    assert "unfinished" in loading.error
    assert leaving.state == S.READY
    assert recent.state == S.DOWNLOADING


@pytest.mark.django_db
def test_a_late_finish_for_an_expired_load_is_refused_and_its_engine_steps_down(queued):
    model = ModelFactory(max_replicas=1)
    agent = AgentFactory()
    placement = actions.ensure_placement(model)
    event = LoadEvent.objects.get(placement=placement, kind=LoadEventKind.LOAD)
    actions.begin_load(event.pk)
    actions.fail_load(event.pk, "the load did not finish within the cold-start timeout")
    queued.clear()

    response = LoadModelResponse(model.model_id, f"{agent.base_url}/models/m", LoadTimings())
    assert actions.finish_load(event.pk, response) is None

    placement.refresh_from_db()
    assert placement.state == S.UNLOADING  # the late engine is stopped, never routed to
    step = LoadEvent.objects.get(placement=placement, kind=LoadEventKind.UNLOAD)
    assert (step.to_level, step.trigger) == (CacheLevel.NVME_CACHED, LoadTrigger.FAILURE)
    assert [name for name, _ in queued] == ["agents.tasks.unload"]
    assert Placement.objects.filter(model=model, state=S.READY).count() == 0


@pytest.mark.django_db
def test_a_heartbeat_inserting_the_row_a_cold_start_wants_is_no_integrity_error(queued):
    """The heartbeat's bulk_create and the load's insert meet on (agent, model)."""
    model = ModelFactory()
    agent = AgentFactory()
    Placement.objects.create(
        agent=agent, model=model, state=S.UNLOADED, cache_level=CacheLevel.NVME_CACHED
    )
    placement = actions.coldstarts._start_load(model, [], LoadTrigger.REQUEST)
    assert (placement.state, placement.agent_id) == (S.LOADING_TO_GPU, agent.pk)
    assert Placement.objects.filter(model=model).count() == 1
    assert LoadEventFactory._meta.model.objects.filter(placement=placement).count() == 1


@pytest.mark.django_db
def test_an_unload_answer_after_its_step_was_failed_still_moves_the_placement(queued):
    serving = PlacementFactory()
    event = actions.unload(serving, CacheLevel.NVME_CACHED, LoadTrigger.OPERATOR)
    actions.fail_unload(event.pk, "the unload did not finish within its timeout")
    serving.refresh_from_db()
    assert serving.state == S.READY  # back to serving, as far as anyone knew
    late = UnloadModelResponse(serving.model.model_id, "UNLOADED", "NVME_CACHED")
    actions.finish_unload(event.pk, late)
    serving.refresh_from_db()
    event.refresh_from_db()
    # The engine is stopped: routing must not send it requests; the step stays failed.
    assert (serving.state, serving.cache_level) == (S.UNLOADED, CacheLevel.NVME_CACHED)
    assert event.outcome == LoadOutcome.FAILED
