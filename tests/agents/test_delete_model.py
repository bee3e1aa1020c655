"""Deleting a catalog model: 409 while adapters depend on it; otherwise its engines are
stopped wherever they run (now, or when a heartbeat next reports one), and usage stays."""

from __future__ import annotations

from datetime import date

import pytest

from agents import actions
from agents.actions import steps
from agents.agent_client import HeartbeatResult
from agents.choices import CacheLevel, PlacementState
from agents.models import LoadEvent, Model, Placement
from controlplane.gateway.models import Usage
from nodeagent.protocol import AgentReportedState, DiskInfo, HeartbeatResponse, ModelStatus
from tests.factories import (
    AgentFactory,
    LoadEventFactory,
    ModelFactory,
    PlacementFactory,
    make_api_key,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def queued(monkeypatch) -> list[tuple[str, tuple]]:
    sent: list[tuple[str, tuple]] = []
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: sent.append((name, args)))
    return sent


def test_a_base_with_adapters_is_a_409_and_nothing_is_deleted(staff_client, queued):
    base = ModelFactory(model_id="org/base")
    ModelFactory(model_id="org/base-sql", base=base, adapter_rank=8)
    response = staff_client.delete("/api/models/org/base/")
    assert response.status_code == 409
    assert "org/base-sql" in response.json()["detail"]
    assert Model.objects.count() == 2
    assert queued == []


def test_deleting_a_model_unloads_it_everywhere_and_keeps_its_usage(staff_client, queued):
    model = ModelFactory(model_id="org/m")
    ready = PlacementFactory(model=model, agent=AgentFactory(agent_id="a1"))
    on_disk = PlacementFactory(
        model=model, agent=AgentFactory(agent_id="a2"), state=PlacementState.UNLOADED,
        cache_level=CacheLevel.NVME_CACHED,
    )  # fmt: skip
    PlacementFactory(
        model=model, agent=AgentFactory(agent_id="a3"), state=PlacementState.UNLOADED,
        cache_level=CacheLevel.NONE,
    )  # fmt: skip
    LoadEventFactory(model=model, agent=ready.agent, placement=ready)
    key, _ = make_api_key()
    Usage.objects.create(api_key=key, model_id="org/m", day=date(2026, 12, 1), requests=7)

    assert staff_client.delete("/api/models/org/m/").status_code == 204
    assert not Model.objects.exists()
    assert not Placement.objects.exists()
    assert not LoadEvent.objects.exists()
    assert Usage.objects.get().requests == 7  # billing history outlives the catalog entry
    assert sorted(queued) == [
        ("agents.tasks.unload_orphan", (ready.agent_id, "org/m")),
        ("agents.tasks.unload_orphan", (on_disk.agent_id, "org/m")),
    ]


def test_deleting_an_adapter_unloads_it_from_the_engines_that_hold_it(queued):
    base = ModelFactory(model_id="org/base")
    adapter = ModelFactory(model_id="org/base-sql", base=base, adapter_rank=8)
    holding = PlacementFactory(model=base, adapters={"org/base-sql": {}}, max_loras=4)
    PlacementFactory(model=base, max_loras=4)
    actions.delete_model(adapter.model_id)
    assert queued == [("agents.tasks.unload_adapter", (holding.pk, "org/base-sql"))]
    assert Model.objects.get() == base


def beat(agent, *models: ModelStatus) -> HeartbeatResult:
    return HeartbeatResult(
        agent.pk,
        0.0,
        HeartbeatResponse(
            agent_id=agent.agent_id,
            state=AgentReportedState.IDLE,
            version="t",
            disk=DiskInfo("/c", 1, 1, 0),
            models=models,
        ),
    )


def test_a_heartbeat_reporting_a_model_not_in_the_catalog_unloads_it(queued):
    agent = AgentFactory(agent_id="a1")
    ModelFactory(model_id="org/kept")
    statuses = [
        ModelStatus("org/gone", "READY", "GPU_RESIDENT"),
        ModelStatus("org/gone-on-disk", "UNLOADED", "NVME_CACHED"),
        ModelStatus("org/gone-failed", "FAILED", "NONE"),
        ModelStatus("org/gone-unloading", "UNLOADING", "GPU_RESIDENT"),  # under way already
        ModelStatus("org/gone-loading", "LOADING_TO_GPU", "NVME_CACHED"),  # asked once loaded
        ModelStatus("org/kept", "READY", "GPU_RESIDENT"),
    ]
    actions.apply_heartbeats([beat(agent, *statuses)])
    assert sorted(args[1] for name, args in queued if name == "agents.tasks.unload_orphan") == [
        "org/gone", "org/gone-failed", "org/gone-on-disk"
    ]  # fmt: skip


def test_an_orphan_unload_is_dropped_once_the_model_is_back_in_the_catalog():
    agent = AgentFactory(agent_id="a1")
    assert actions.orphan_unload_target(agent.pk, "org/m") == (agent.base_url, agent.credential)
    ModelFactory(model_id="org/m")
    assert actions.orphan_unload_target(agent.pk, "org/m") is None
