"""Fleet metrics read from the database, the dashboard page, and the Grafana dashboard."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agents.actions import history
from agents.choices import AgentState, CacheLevel, LoadEventKind, LoadOutcome, LoadTrigger
from controlplane.metrics import FleetCollector
from tests.factories import AgentFactory, LoadEventFactory, PlacementFactory

ROOT = Path(__file__).resolve().parents[2]


def samples() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in FleetCollector().collect()
        for sample in family.samples
    }


@pytest.mark.django_db
def test_fleet_metrics_count_agents_placements_loads_and_phases():
    busy = AgentFactory(agent_id="a1", state=AgentState.INFERRING, engine_queue_length=3)
    AgentFactory(agent_id="a2", state=AgentState.OFFLINE, gpu_memory_free=7)
    PlacementFactory(agent=busy, model__model_id="org/m", kv_cache_hit_rate=0.75)
    finished = [
        LoadEventFactory(outcome=LoadOutcome.SUCCEEDED, queue_seconds=0.5, download_seconds=2.0,
                         engine_start_seconds=30.0),
        LoadEventFactory(outcome=LoadOutcome.FAILED),
        LoadEventFactory(kind=LoadEventKind.UNLOAD, outcome=LoadOutcome.SUCCEEDED,
                         trigger=LoadTrigger.KEEP_ALIVE, from_level=CacheLevel.GPU_RESIDENT,
                         to_level=CacheLevel.NVME_CACHED),
    ]  # fmt: skip
    LoadEventFactory(outcome=LoadOutcome.PENDING)
    for event in finished:  # as the actions do when a step finishes
        history.count_finished(event)
    found = samples()
    assert found["llmfleet_agents", (("state", "INFERRING"),)] == 1
    assert found["llmfleet_agents", (("state", "DRAINING"),)] == 0  # every state, zeros too
    assert found["llmfleet_placements", (("cache_level", "GPU_RESIDENT"), ("model", "org/m"))] == 1
    assert found["llmfleet_agent_gpu_memory_free_bytes", (("agent", "a2"),)] == 7
    assert found["llmfleet_agent_engine_queue_length", (("agent", "a1"),)] == 3
    replica = (("agent", "a1"), ("model", "org/m"))
    assert found["llmfleet_replica_prefix_cache_hit_ratio", replica] == 0.75
    assert found["llmfleet_cold_starts_total", (("outcome", "succeeded"),)] == 1
    assert found["llmfleet_cold_starts_total", (("outcome", "failed"),)] == 1
    assert found["llmfleet_loads_total", (("from_level", "NONE"),)] == 1
    evicted = (("to_level", "NVME_CACHED"), ("trigger", "KEEP_ALIVE"))
    assert found["llmfleet_evictions_total", evicted] == 1
    assert found["llmfleet_cold_start_phase_seconds_sum", (("phase", "engine_start"),)] == 30.0
    assert found["llmfleet_cold_start_phase_seconds_count", (("phase", "download"),)] == 1
    assert found["llmfleet_cold_start_phase_seconds_count", (("phase", "first_token"),)] == 0


@pytest.mark.django_db
def test_fleet_metrics_never_break_metrics_when_the_database_is_away(monkeypatch):
    from django.db import OperationalError

    from agents.models import Agent

    def away(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(type(Agent.objects), "values_list", away)
    assert list(FleetCollector().collect()) == []


@pytest.mark.django_db
def test_the_dashboard_is_for_staff(client, staff_client):
    assert client.get("/dashboard/").status_code == 302
    page = staff_client.get("/dashboard/")
    assert page.status_code == 200
    assert b"/ws/fleet/" in page.content


def metric_names_in_code() -> set[str]:
    names = set()
    for path in ("controlplane/metrics.py", "nodeagent/metrics.py"):
        names |= set(re.findall(r'"(llmfleet_[a-z_]+)"', (ROOT / path).read_text()))
    return names


def test_the_grafana_dashboard_only_uses_metrics_that_exist():
    dashboard = json.loads((ROOT / "docker/grafana/llmfleet-dashboard.json").read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"llmfleet_[a-z_]+", expr)}
    known = metric_names_in_code()
    suffixes = ("_total", "_bucket", "_sum", "_count")
    for name in used:
        base = next((name.removesuffix(s) for s in suffixes if name.endswith(s)), name)
        assert name in known or base in known, name
    assert len(dashboard["panels"]) >= 10
