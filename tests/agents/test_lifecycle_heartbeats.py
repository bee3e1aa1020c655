"""Heartbeats and the sweep, against the database: what an agent's answers (or silence) and
the gateway's verdicts write, idle replicas stepped down, and steps whose tasks died closed."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from agents import actions
from agents.actions import steps, sweeps
from agents.agent_client import HeartbeatResult
from agents.choices import (
    AgentState,
    CacheLevel,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
    PlacementState,
)
from agents.models import Agent, LoadEvent, Placement
from nodeagent.protocol import ModelStatus, UnloadModelResponse
from tests.agents.conftest import beat
from tests.factories import AgentFactory, LoadEventFactory, ModelFactory, PlacementFactory


def missed(agent: Agent) -> HeartbeatResult:
    return HeartbeatResult(agent.pk, time.time(), None, "connection refused")


@pytest.mark.django_db
def test_missed_heartbeats_take_an_agent_offline_and_an_answer_brings_it_back(settings):
    settings.HEARTBEAT_DEGRADED_AFTER, settings.HEARTBEAT_OFFLINE_AFTER = 1, 3
    agent = AgentFactory()
    states = []
    for _ in range(3):
        actions.apply_heartbeats([missed(agent)])
        agent.refresh_from_db()
        states.append(agent.state)
    assert states == [AgentState.DEGRADED, AgentState.DEGRADED, AgentState.OFFLINE]
    actions.apply_heartbeats([beat(agent, state="INFERRING")])
    agent.refresh_from_db()
    assert (agent.state, agent.heartbeat_failures) == (AgentState.INFERRING, 0)


@pytest.mark.django_db
def test_heartbeats_reconcile_what_the_agent_still_has_and_what_it_lost():
    agent = AgentFactory()
    kept, lost, found = ModelFactory(), ModelFactory(), ModelFactory()
    PlacementFactory(agent=agent, model=kept, state=PlacementState.UNLOADED,
                     cache_level=CacheLevel.NVME_CACHED)  # fmt: skip
    PlacementFactory(agent=agent, model=lost)
    Placement.objects.update(updated_at=timezone.now() - timedelta(minutes=5))
    actions.apply_heartbeats([
        beat(agent,
             ModelStatus(kept.model_id, "READY", "GPU_RESIDENT", f"{agent.base_url}/models/k",
                         requests_waiting=4, last_used_at="2026-11-27T10:00:00+00:00"),
             ModelStatus(found.model_id, "UNLOADED", "NVME_CACHED"),
             ModelStatus("org/not-in-the-catalog", "READY", "GPU_RESIDENT")),
    ])  # fmt: skip
    placements = {p.model_id: p for p in Placement.objects.all()}
    assert placements[kept.pk].state == PlacementState.READY
    assert placements[kept.pk].requests_waiting == 4
    assert placements[kept.pk].inference_endpoint_url == f"{agent.base_url}/models/k"
    assert (placements[lost.pk].state, placements[lost.pk].cache_level) == (
        PlacementState.UNLOADED,
        CacheLevel.NONE,
    )
    assert placements[found.pk].cache_level == CacheLevel.NVME_CACHED
    assert len(placements) == 3


@pytest.mark.django_db
def test_a_heartbeat_never_undoes_a_load_or_unload_the_control_plane_has_under_way(queued):
    agent = AgentFactory()
    model, other = ModelFactory(), ModelFactory()
    placement = actions.ensure_placement(model)
    going = PlacementFactory(agent=agent, model=other)
    actions.unload(going, CacheLevel.NVME_CACHED)
    Placement.objects.update(updated_at=timezone.now() - timedelta(seconds=1))
    actions.apply_heartbeats([
        beat(agent, ModelStatus(model.model_id, "FAILED", "NONE", error="an older failure"),
             ModelStatus(other.model_id, "READY", "GPU_RESIDENT", f"{agent.base_url}/models/o")),
    ])  # fmt: skip
    assert Placement.objects.get(pk=placement.pk).state == PlacementState.DOWNLOADING
    assert Placement.objects.get(pk=going.pk).state == PlacementState.UNLOADING


@pytest.mark.django_db
def test_the_sweep_steps_idle_models_down_and_records_each_step(queued):
    idle = PlacementFactory(model=ModelFactory(keep_alive=timedelta(minutes=1)))
    fresh = PlacementFactory(model=ModelFactory(keep_alive=timedelta(minutes=1)))
    pinned = PlacementFactory(model=ModelFactory(keep_alive=timedelta(minutes=1), pinned=True))
    long_ago = timezone.now() - timedelta(minutes=5)
    Placement.objects.filter(pk__in=[idle.pk, pinned.pk]).update(last_used_at=long_ago)
    Placement.objects.filter(pk=fresh.pk).update(last_used_at=timezone.now())
    events = actions.sweep()
    assert [(e.placement_id, e.trigger, e.to_level) for e in events] == [
        (idle.pk, LoadTrigger.KEEP_ALIVE, CacheLevel.DRAM_CACHED)
    ]
    assert Placement.objects.get(pk=idle.pk).state == PlacementState.UNLOADING
    assert queued == [("agents.tasks.unload", (events[0].pk,))]
    # The engine could not sleep: the agent went further, to local disk.
    actions.finish_unload(
        events[0].pk,
        UnloadModelResponse(idle.model.model_id, "UNLOADED", "NVME_CACHED", note="cannot sleep"),
    )
    idle.refresh_from_db()
    assert (idle.state, idle.cache_level) == (PlacementState.UNLOADED, CacheLevel.NVME_CACHED)
    assert LoadEvent.objects.get(pk=events[0].pk).to_level == CacheLevel.NVME_CACHED


@pytest.mark.django_db
def test_the_sweep_reads_a_replica_keep_alive_before_its_model(queued):
    # Each model would step down after a minute; what its last request asked decides.
    extended, shortened, plain = (
        PlacementFactory(model=ModelFactory(keep_alive=timedelta(minutes=1))) for _ in range(3)
    )
    Placement.objects.filter(pk=extended.pk).update(keep_alive=timedelta(minutes=30))
    Placement.objects.filter(pk=shortened.pk).update(keep_alive=timedelta(0))
    Placement.objects.filter(pk=shortened.pk).update(last_used_at=timezone.now())
    five_minutes_ago = timezone.now() - timedelta(minutes=5)
    Placement.objects.filter(pk__in=[extended.pk, plain.pk]).update(last_used_at=five_minutes_ago)
    events = actions.sweep()
    assert sorted(e.placement_id for e in events) == sorted([shortened.pk, plain.pk])


@pytest.mark.django_db
def test_a_refused_unload_leaves_the_replica_serving(queued):
    placement = PlacementFactory()
    event = actions.unload(placement, CacheLevel.NVME_CACHED)
    actions.fail_unload(event.pk, "requests_in_flight: 2 request(s) in flight")
    assert Placement.objects.get(pk=placement.pk).state == PlacementState.READY
    assert LoadEvent.objects.get(pk=event.pk).outcome == LoadOutcome.FAILED


@pytest.mark.django_db
def test_the_sweep_keeps_min_replicas_warm_and_fails_loads_left_pending(queued, settings):
    model = ModelFactory(min_replicas=1)
    AgentFactory()
    stuck = LoadEventFactory(outcome=LoadOutcome.PENDING)
    LoadEvent.objects.filter(pk=stuck.pk).update(
        queued_at=timezone.now() - timedelta(seconds=settings.COLD_START_TIMEOUT_SECONDS + 120)
    )
    actions.sweep()
    assert LoadEvent.objects.get(pk=stuck.pk).outcome == LoadOutcome.FAILED
    started = LoadEvent.objects.get(model=model)
    assert started.trigger == LoadTrigger.SCALE_OUT


@pytest.mark.django_db
def test_update_rows_writes_json_nulls_floats_and_times_by_primary_key():
    from agents.bulk import update_rows

    first, second, untouched = AgentFactory(), AgentFactory(), AgentFactory()
    now = timezone.now()
    first.gpus, first.gpu_utilization, first.last_heartbeat_at = [{"index": 0}], 12.5, now
    second.gpus, second.gpu_utilization, second.last_heartbeat_at = [], None, None
    first.gpu_name = untouched.gpu_name = "changed but not written"
    update_rows([first, second], ["gpus", "gpu_utilization", "last_heartbeat_at"])
    first.refresh_from_db()
    second.refresh_from_db()
    untouched.refresh_from_db()
    assert (first.gpus, first.gpu_utilization, first.last_heartbeat_at) == (
        [{"index": 0}],
        12.5,
        now,
    )
    assert (second.gpus, second.gpu_utilization, second.last_heartbeat_at) == ([], None, None)
    assert first.gpu_name != "changed but not written"
    assert untouched.gpu_name != "changed but not written"


@pytest.mark.django_db
def test_steps_whose_tasks_died_end_as_the_agent_did_them(queued):
    """A worker killed mid-load or mid-unload: the agent finished the step anyway; the next
    heartbeat says so and the sweep closes the step, so nothing stays pending."""
    agent = AgentFactory()
    endpoint = f"{agent.base_url}/models/l"
    loading, leaving = ModelFactory(), ModelFactory()
    load = actions.ensure_placement(loading)
    going = PlacementFactory(agent=agent, model=leaving)
    step_down = actions.unload(going, CacheLevel.NVME_CACHED)
    actions.begin_load(LoadEvent.objects.get(placement=load, kind=LoadEventKind.LOAD).pk)
    actions.begin_unload(step_down.pk)  # both tasks die here, before writing their outcome
    Placement.objects.update(updated_at=timezone.now() - timedelta(seconds=1))
    actions.apply_heartbeats([
        beat(agent, ModelStatus(loading.model_id, "READY", "GPU_RESIDENT", endpoint),
             ModelStatus(leaving.model_id, "UNLOADED", "NVME_CACHED")),
    ])  # fmt: skip
    load.refresh_from_db()
    assert (load.state, load.inference_endpoint_url) == (
        PlacementState.READY,
        f"{agent.base_url}/models/l",
    )
    assert Placement.objects.get(pk=going.pk).state == PlacementState.UNLOADED
    assert actions.settle_orphaned_steps() == 2
    outcomes = {event.kind: (event.outcome, event.to_level) for event in LoadEvent.objects.all()}
    assert outcomes[LoadEventKind.LOAD][0] == LoadOutcome.SUCCEEDED
    assert outcomes[LoadEventKind.UNLOAD] == (LoadOutcome.SUCCEEDED, CacheLevel.NVME_CACHED)


@pytest.mark.django_db
def test_a_step_never_started_is_queued_again_and_an_unload_past_its_time_fails(
    monkeypatch, queued
):
    sent: list[tuple[str, tuple[object, ...]]] = []
    monkeypatch.setattr(steps, "send", lambda name, *args, **_: sent.append((name, args)))
    sweeps._resent_at.clear()
    agent = AgentFactory()
    actions.ensure_placement(ModelFactory())  # its task was never delivered (a broker blink)
    going = PlacementFactory(agent=agent)
    stuck = actions.unload(going, CacheLevel.NVME_CACHED)
    actions.begin_unload(stuck.pk)  # started, then its worker died before the agent answered
    LoadEvent.objects.update(queued_at=timezone.now() - timedelta(seconds=60))
    LoadEvent.objects.filter(pk=stuck.pk).update(
        queued_at=timezone.now() - timedelta(seconds=actions.UNLOAD_TIMEOUT_SECONDS + 61)
    )
    assert actions.settle_orphaned_steps() == 1
    load = LoadEvent.objects.get(kind=LoadEventKind.LOAD)
    assert sent == [("agents.tasks.load", (load.pk,))]
    assert LoadEvent.objects.get(pk=stuck.pk).outcome == LoadOutcome.FAILED
    assert Placement.objects.get(pk=going.pk).state == PlacementState.READY  # serving again
    actions.settle_orphaned_steps()
    assert len(sent) == 1  # not again within _RESEND_AFTER


@pytest.mark.django_db
def test_what_the_gateway_saw_of_a_replica_is_written_at_once(settings):
    from agents.faults import Fault

    settings.HEARTBEAT_DEGRADED_AFTER = 2
    placement = PlacementFactory(ready_at=timezone.now())
    actions.replica_failed(placement.pk, placement.ready_at, Fault.UNREACHABLE, "refused")
    agent = Agent.objects.get(pk=placement.agent_id)
    # One more missed heartbeat than the verdict needs, so the next miss does not undo it.
    assert (agent.state, agent.heartbeat_failures) == (AgentState.DEGRADED, 2)
    assert Placement.objects.get(pk=placement.pk).state == PlacementState.READY

    other = PlacementFactory(ready_at=timezone.now())
    actions.replica_failed(other.pk, other.ready_at, Fault.DRAINING, "agent_draining")
    assert Agent.objects.get(pk=other.agent_id).state == AgentState.DRAINING

    gone = PlacementFactory(ready_at=timezone.now())
    reloaded_since = gone.ready_at - timedelta(seconds=5)  # the gateway tried an older load
    actions.replica_failed(gone.pk, reloaded_since, Fault.NOT_SERVING, "model_not_found")
    assert Placement.objects.get(pk=gone.pk).state == PlacementState.READY
    actions.replica_failed(gone.pk, gone.ready_at, Fault.NOT_SERVING, "model_not_found: gone")
    failed = Placement.objects.get(pk=gone.pk)
    assert (failed.state, failed.error) == (PlacementState.FAILED, "gateway: model_not_found: gone")


@pytest.mark.django_db
def test_a_heartbeat_before_a_step_from_host_ram_to_disk_does_not_end_it(queued):
    """In host RAM the agent says UNLOADED (DRAM_CACHED); the step down to disk it has not
    done yet must not end on that (the flaky lifecycle test: a third step down)."""
    agent = AgentFactory()
    asleep = PlacementFactory(
        agent=agent, state=PlacementState.UNLOADED, cache_level=CacheLevel.DRAM_CACHED
    )
    actions.unload(asleep, CacheLevel.NVME_CACHED)
    Placement.objects.update(updated_at=timezone.now() - timedelta(seconds=1))
    before = beat(agent, ModelStatus(asleep.model.model_id, "UNLOADED", "DRAM_CACHED"))
    actions.apply_heartbeats([before])
    assert Placement.objects.get(pk=asleep.pk).state == PlacementState.UNLOADING
    Placement.objects.update(updated_at=timezone.now() - timedelta(seconds=1))
    after = beat(agent, ModelStatus(asleep.model.model_id, "UNLOADED", "NVME_CACHED"))
    actions.apply_heartbeats([after])
    stepped = Placement.objects.get(pk=asleep.pk)
    assert (stepped.state, stepped.cache_level) == (PlacementState.UNLOADED, CacheLevel.NVME_CACHED)
