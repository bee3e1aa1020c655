"""A model never keeps more GPU replicas than max_replicas, whichever way they arrived: here a
load the control plane gave up on (and retried elsewhere) that finished after all, its
FAILED placement turned READY by the agent's heartbeat."""

from __future__ import annotations

import time

import pytest

from agents import actions
from agents.actions import steps
from agents.agent_client import HeartbeatResult
from agents.choices import CacheLevel, LoadTrigger, PlacementState
from agents.models import LoadEvent, Placement
from nodeagent.protocol import AgentReportedState, DiskInfo, HeartbeatResponse, ModelStatus
from tests.factories import AgentFactory, ModelFactory, PlacementFactory

pytestmark = pytest.mark.django_db


def test_a_failed_replica_that_comes_back_ready_beyond_max_replicas_steps_down(monkeypatch):
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    model = ModelFactory(model_id="org/m", max_replicas=1, keep_alive="01:00:00")
    slow = AgentFactory(agent_id="slow")
    given_up = PlacementFactory(
        model=model, agent=slow, state=PlacementState.FAILED, cache_level=CacheLevel.NVME_CACHED
    )
    PlacementFactory(model=model, agent=AgentFactory(agent_id="retry"))  # READY, serving
    endpoint = f"{slow.base_url}/models/org/m"
    beat = HeartbeatResponse(
        agent_id="slow", state=AgentReportedState.IDLE, version="t",
        disk=DiskInfo("/c", 1, 1, 0),
        models=(ModelStatus("org/m", "READY", "GPU_RESIDENT", inference_endpoint_url=endpoint),),
    )  # fmt: skip
    actions.apply_heartbeats([HeartbeatResult(slow.pk, time.time(), beat)])
    given_up.refresh_from_db()
    assert given_up.state == PlacementState.READY  # what the agent says it serves, it serves

    actions.sweep()
    ready = Placement.objects.filter(model=model, state=PlacementState.READY)
    assert ready.count() == 1
    (step,) = LoadEvent.objects.filter(trigger=LoadTrigger.EXCESS)
    assert step.placement.state == PlacementState.UNLOADING


def test_a_heartbeat_round_steps_the_excess_down_at_once(monkeypatch):
    """What a round brought back is stepped down by the round's task, not a sweep later; a
    model within its bound costs one grouped query and nothing else."""
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    model = ModelFactory(model_id="org/m", max_replicas=1)
    PlacementFactory(model=model, agent=AgentFactory(agent_id="a"))
    assert actions.step_down_excess() == []
    PlacementFactory(model=model, agent=AgentFactory(agent_id="b"))
    PlacementFactory(model=ModelFactory(model_id="org/roomy", max_replicas=2))
    (step,) = actions.step_down_excess()
    assert step.trigger == LoadTrigger.EXCESS
    assert step.model == model
    assert Placement.objects.filter(model=model, state=PlacementState.READY).count() == 1


def test_two_deciders_choosing_different_excess_replicas_leave_max_replicas_serving(monkeypatch):
    """The sweep and a heartbeat round each read, and each chose another replica: the second
    step down finds the model within its bound and is dropped."""
    from agents.actions import sweeps
    from agents.scheduling import Demotion

    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    model = ModelFactory(model_id="org/m", max_replicas=1)
    first = PlacementFactory(model=model, agent=AgentFactory(agent_id="a"))
    second = PlacementFactory(model=model, agent=AgentFactory(agent_id="b"))
    read = {p.pk: p for p in (first, second)}
    assert sweeps._step_down([Demotion(first.pk, "DRAM_CACHED", LoadTrigger.EXCESS)], read)
    assert not sweeps._step_down([Demotion(second.pk, "DRAM_CACHED", LoadTrigger.EXCESS)], read)
    assert Placement.objects.filter(model=model, state=PlacementState.READY).count() == 1
