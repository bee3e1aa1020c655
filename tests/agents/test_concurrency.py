"""Heartbeat rounds, sweeps, cold starts and their tasks' outcomes, all at once on PostgreSQL:
one lock order everywhere (model, placements, agents, load events, each by primary key) means
no deadlock, and inserts that meet (a heartbeat's and a cold start's) no IntegrityError."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections.abc import Callable

import pytest
from django.db import connection

from agents import actions, agent_client
from agents.actions import steps
from agents.choices import LoadEventKind, LoadOutcome, PlacementState
from agents.models import Agent, LoadEvent, Model, Placement
from nodeagent.protocol import (
    AgentReportedState,
    CacheLevel,
    DiskInfo,
    HeartbeatResponse,
    LoadModelResponse,
    LoadTimings,
    ModelState,
    ModelStatus,
)
from tests.factories import AgentFactory, ModelFactory

pytestmark = pytest.mark.django_db(transaction=True)

SECONDS = 8.0
REPORTS = [
    (ModelState.READY, CacheLevel.GPU_RESIDENT),
    (ModelState.UNLOADED, CacheLevel.NVME_CACHED),
    (ModelState.UNLOADED, CacheLevel.DRAM_CACHED),
    (ModelState.DOWNLOADING, CacheLevel.NONE),
    (ModelState.LOADING_TO_GPU, CacheLevel.NVME_CACHED),
]


def heartbeat_round(rng: random.Random) -> None:
    results = []
    for agent in Agent.objects.all():
        models = tuple(
            ModelStatus(model.model_id, state, level,
                        f"{agent.base_url}/models/{model.model_id}" if state == "READY" else "")
            for model in Model.objects.all() if rng.random() < 0.7
            for state, level in [rng.choice(REPORTS)]
        )  # fmt: skip
        beat = HeartbeatResponse(
            agent_id=agent.agent_id, state=AgentReportedState.IDLE, version="1",
            disk=DiskInfo("/c", 1, 1, 0), models=models,
        )  # fmt: skip
        results.append(agent_client.HeartbeatResult(agent.pk, time.time(), beat))
    rng.shuffle(results)
    actions.apply_heartbeats(results)


def cold_start(rng: random.Random) -> None:
    model = rng.choice(list(Model.objects.all()))
    with contextlib.suppress(actions.NoCapacity):
        actions.ensure_placement(model)


def finish_some(rng: random.Random) -> None:
    pending = list(
        LoadEvent.objects.filter(outcome=LoadOutcome.PENDING).select_related("agent", "model")
    )
    for event in rng.sample(pending, min(3, len(pending))):
        if event.kind == LoadEventKind.LOAD:
            actions.begin_load(event.pk)
            if rng.random() < 0.7:
                url = f"{event.agent.base_url}/models/{event.model.model_id}"
                actions.finish_load(event.pk, LoadModelResponse(event.model.model_id, url,
                                                                LoadTimings()))  # fmt: skip
            else:
                actions.fail_load(event.pk, "boom")
        else:
            actions.begin_unload(event.pk)
            actions.fail_unload(event.pk, "refused")


def operator(rng: random.Random) -> None:
    placement = Placement.objects.filter(state=PlacementState.READY).order_by("?").first()
    if placement is not None:
        if rng.random() < 0.5:
            with contextlib.suppress(actions.CannotStepDown):
                actions.unload(placement, CacheLevel.NVME_CACHED)
        else:
            actions.replica_failed(placement.pk, placement.ready_at, "unreachable", "gone")
    agent = Agent.objects.order_by("?").first()
    if agent is not None:
        (actions.drain_agent if rng.random() < 0.5 else actions.undrain_agent)(agent.agent_id)


def test_heartbeats_sweeps_and_cold_starts_at_once_never_deadlock(monkeypatch, settings):
    settings.GPU_MEMORY_PRESSURE_PERCENT = 50
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    for _ in range(4):
        AgentFactory()
    for _ in range(6):
        ModelFactory(min_replicas=1, max_replicas=2)
    errors: list[BaseException] = []
    rounds: dict[str, int] = {}
    stop = time.monotonic() + SECONDS

    def loop(name: str, work: Callable[[random.Random], None]) -> None:
        rng = random.Random(name)
        try:
            while time.monotonic() < stop and not errors:
                work(rng)
                rounds[name] = rounds.get(name, 0) + 1
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    workers = {
        "heartbeats": heartbeat_round, "heartbeats-2": heartbeat_round,
        "sweep": lambda rng: actions.sweep(), "cold-1": cold_start, "cold-2": cold_start,
        "tasks": finish_some, "operator": operator,
    }  # fmt: skip
    threads = [threading.Thread(target=loop, args=item) for item in workers.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(SECONDS + 60)
    assert errors == []
    assert all(rounds.get(name, 0) >= 3 for name in workers), rounds
