"""Cold starts and load outcomes, against the database: the agent a load goes to, what steps
down to make room for it, scale-out, a finished or failed load, and the rows a load locks."""

from __future__ import annotations

import threading
from datetime import timedelta

import pytest
from django.db import connection
from django.utils import timezone

from agents import actions
from agents.choices import (
    AgentState,
    CacheLevel,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
    PlacementState,
)
from agents.models import Agent, LoadEvent, Placement
from nodeagent.protocol import LoadModelResponse, LoadTimings
from tests.factories import GIB, AgentFactory, LoadEventFactory, ModelFactory, PlacementFactory


@pytest.mark.django_db(transaction=True)
def test_concurrent_cold_requests_trigger_one_load(queued):
    model = ModelFactory()
    AgentFactory.create_batch(3)
    results: list[int] = []
    errors: list[BaseException] = []
    start = threading.Barrier(20)

    def cold_request() -> None:
        try:
            start.wait()
            results.append(actions.ensure_placement(model).pk)
        except BaseException as exc:  # reported by the assertion below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=cold_request) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert len(set(results)) == 1
    assert len(results) == 20
    assert LoadEvent.objects.filter(kind=LoadEventKind.LOAD).count() == 1
    assert [name for name, _ in queued] == ["agents.tasks.load"]


@pytest.mark.django_db
def test_the_agent_with_the_model_on_disk_is_chosen_and_unroutable_ones_never(queued):
    model = ModelFactory()
    AgentFactory(agent_id="empty")
    disk = AgentFactory(agent_id="disk")
    ram = AgentFactory(agent_id="ram-but-draining", state=AgentState.DRAINING)
    PlacementFactory(agent=disk, model=model, state=PlacementState.UNLOADED,
                     cache_level=CacheLevel.NVME_CACHED)  # fmt: skip
    PlacementFactory(agent=ram, model=model, state=PlacementState.UNLOADED,
                     cache_level=CacheLevel.DRAM_CACHED)  # fmt: skip
    placement = actions.ensure_placement(model)
    assert placement.agent == disk
    assert placement.state == PlacementState.LOADING_TO_GPU
    event = LoadEvent.objects.get(kind=LoadEventKind.LOAD)
    assert (event.from_level, event.trigger) == (CacheLevel.NVME_CACHED, LoadTrigger.REQUEST)


@pytest.mark.django_db
def test_a_ready_replica_or_a_load_under_way_is_reused(queued):
    model = ModelFactory()
    loading = PlacementFactory(model=model, state=PlacementState.DOWNLOADING)
    assert actions.ensure_placement(model) == loading
    ready = PlacementFactory(model=model)
    assert actions.ensure_placement(model) == ready
    assert queued == []


@pytest.mark.django_db
def test_no_agent_is_no_capacity():
    with pytest.raises(actions.NoCapacity, match="no agent that takes new work"):
        actions.ensure_placement(ModelFactory())


@pytest.mark.django_db
def test_a_full_agent_steps_its_least_recently_used_idle_model_down_first(queued):
    agent = AgentFactory(gpu_memory_total=80 * GIB, gpu_memory_free=2 * GIB)
    old = timezone.now() - timedelta(hours=2)
    idle = PlacementFactory(agent=agent, model=ModelFactory(gpu_memory_bytes=30 * GIB))
    Placement.objects.filter(pk=idle.pk).update(last_used_at=old)
    PlacementFactory(agent=agent, model=ModelFactory(gpu_memory_bytes=30 * GIB, pinned=True))
    busy = PlacementFactory(agent=agent, model=ModelFactory(gpu_memory_bytes=18 * GIB))
    Placement.objects.filter(pk=busy.pk).update(requests_in_flight=3)
    actions.ensure_placement(ModelFactory(gpu_memory_bytes=20 * GIB))
    unload = LoadEvent.objects.get(kind=LoadEventKind.UNLOAD)
    assert (unload.placement_id, unload.trigger) == (idle.pk, LoadTrigger.PRESSURE)
    assert Placement.objects.get(pk=idle.pk).state == PlacementState.UNLOADING
    load = LoadEvent.objects.get(kind=LoadEventKind.LOAD)
    assert queued == [("agents.tasks.load", (load.pk, [unload.pk]))]


@pytest.mark.django_db
def test_a_batch_waiting_for_idle_capacity_steps_down_only_models_idle_long_enough(queued):
    agent = AgentFactory(gpu_memory_total=80 * GIB, gpu_memory_free=2 * GIB)
    recent = PlacementFactory(agent=agent, model=ModelFactory(gpu_memory_bytes=70 * GIB))
    Placement.objects.filter(pk=recent.pk).update(
        last_used_at=timezone.now() - timedelta(seconds=60)
    )
    wanted = ModelFactory(gpu_memory_bytes=20 * GIB)
    # Used a minute ago: interactive traffic may come back to it, so a batch does not take it.
    with pytest.raises(actions.NoCapacity, match="used in the last 300 s") as refused:
        actions.ensure_placement(wanted, LoadTrigger.BATCH, 300)
    assert refused.value.idle_only
    assert not LoadEvent.objects.exists()
    assert queued == []
    # Five minutes idle, it is idle capacity; and a batch whose deadline needs it takes it anyway.
    actions.ensure_placement(wanted, LoadTrigger.BATCH, 30)
    load = LoadEvent.objects.get(kind=LoadEventKind.LOAD)
    assert (load.model_id, load.trigger) == (wanted.pk, LoadTrigger.BATCH)
    unload = LoadEvent.objects.get(kind=LoadEventKind.UNLOAD)
    assert unload.placement_id == recent.pk


@pytest.mark.django_db
def test_a_finished_load_is_ready_with_its_phases_recorded(queued):
    model = ModelFactory(size_bytes=GIB)
    placement = actions.ensure_placement(model) if AgentFactory() else None
    event = LoadEvent.objects.get()
    job = actions.begin_load(event.pk)
    assert job is not None
    assert job.request.model_id == model.model_id
    assert actions.begin_load(event.pk) is None  # a redelivered task does nothing
    timings = LoadTimings(
        download_seconds=2.0, engine_start_seconds=25.0, total_seconds=27.5,
        engine_start="plain", engine_start_note="no standby was ready (all taken)",
        compile_cache="store",
    )  # fmt: skip
    actions.finish_load(
        event.pk, LoadModelResponse(model.model_id, f"{job.agent_url}/models/m", timings)
    )
    placement = Placement.objects.get(pk=placement.pk)
    assert (placement.state, placement.cache_level) == (
        PlacementState.READY,
        CacheLevel.GPU_RESIDENT,
    )
    assert placement.inference_endpoint_url == f"{job.agent_url}/models/m"
    event.refresh_from_db()
    assert event.outcome == LoadOutcome.SUCCEEDED
    assert (event.download_seconds, event.engine_start_seconds) == (2.0, 25.0)
    assert (event.engine_start, event.engine_start_note, event.compile_cache) == (
        "plain", "no standby was ready (all taken)", "store"
    )  # fmt: skip
    assert event.bytes_downloaded == GIB
    assert event.queue_seconds is not None
    actions.record_first_token(placement.pk)
    event.refresh_from_db()
    assert event.first_token_seconds is not None
    assert event.first_token_seconds >= 0


@pytest.mark.django_db
def test_a_failed_load_moves_to_the_next_agent_until_attempts_run_out(queued, settings):
    settings.LOAD_ATTEMPTS = 2
    model = ModelFactory()
    AgentFactory.create_batch(3)
    first = actions.ensure_placement(model)
    retry = actions.fail_load(LoadEvent.objects.get().pk, "engine_start_failed: boom")
    assert retry is not None
    assert retry.agent != first.agent
    assert Placement.objects.get(pk=first.pk).state == PlacementState.FAILED
    assert LoadEvent.objects.filter(trigger=LoadTrigger.FAILURE).count() == 1
    last = LoadEvent.objects.get(outcome=LoadOutcome.PENDING)
    assert actions.fail_load(last.pk, "engine_start_failed: boom again") is None
    # Both tried agents sit out the backoff; the third is still tried by a new request.
    third = actions.ensure_placement(model)
    assert third.agent not in {first.agent, retry.agent}
    actions.fail_load(LoadEvent.objects.get(outcome=LoadOutcome.PENDING).pk, "x: third")
    with pytest.raises(actions.NoCapacity, match="failed on 3 agent"):
        actions.ensure_placement(model)


@pytest.mark.django_db
def test_scale_out_loads_one_more_replica_elsewhere_up_to_max_replicas(queued):
    model = ModelFactory(max_replicas=2)
    first = PlacementFactory(model=model)
    AgentFactory(agent_id="spare")
    second = actions.scale_out(model)
    assert second is not None
    assert second.agent.agent_id == "spare"
    assert LoadEvent.objects.get().trigger == LoadTrigger.SCALE_OUT
    assert actions.scale_out(model) is None  # two replicas (one loading): the most allowed
    assert first.agent != second.agent


@pytest.mark.django_db(transaction=True)
def test_claiming_a_load_locks_the_event_alone_not_its_agent_or_model(queued):
    """A heartbeat round holds its agents' rows; claiming a load there must not wait on them
    (with the joined rows locked too, the two deadlocked under load)."""
    from django.db import transaction

    model = ModelFactory()
    agent = AgentFactory()
    actions.ensure_placement(model)
    event = LoadEvent.objects.get()
    held, release = threading.Event(), threading.Event()

    def round_holding_the_agent() -> None:
        with transaction.atomic():
            list(Agent.objects.select_for_update(no_key=True).filter(pk=agent.pk))
            list(type(model).objects.select_for_update(no_key=True).filter(pk=model.pk))
            held.set()
            release.wait(10)
        connection.close()

    holder = threading.Thread(target=round_holding_the_agent)
    holder.start()
    try:
        assert held.wait(10)
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
            assert actions.begin_load(event.pk) is not None
        # Finishing it, too: Placement's default ordering joins its model and agent, which
        # FOR UPDATE without OF locked as well (the flaky lifecycle test's deadlock with a
        # heartbeat round, which locks agents, then placements).
        with transaction.atomic():
            with connection.cursor() as cursor:
                cursor.execute("SET LOCAL lock_timeout = '2s'")
            response = LoadModelResponse(
                model.model_id, f"{agent.base_url}/models/m", LoadTimings()
            )
            assert actions.finish_load(event.pk, response) is not None
    finally:
        release.set()
        holder.join()


def test_every_row_lock_in_the_actions_locks_its_own_rows_alone():
    """FOR UPDATE on a query that joins (select_related, or a Meta.ordering across a
    relation) locks the joined rows too, in an order no docstring names: deadlocks."""
    import re
    from pathlib import Path

    source = "".join(path.read_text() for path in Path(actions.__file__).parent.glob("*.py"))
    calls = re.findall(r"select_for_update\(([^)]*)\)", source)
    assert calls, "the walk went stale"
    assert all('of=("self",' in call for call in calls), calls


@pytest.mark.django_db
def test_an_old_load_failing_does_not_undo_a_newer_load_of_the_same_placement(queued):
    AgentFactory()
    model = ModelFactory()
    placement = actions.ensure_placement(model)
    old = LoadEvent.objects.get()
    LoadEvent.objects.filter(pk=old.pk).update(queued_at=timezone.now() - timedelta(minutes=5))
    LoadEventFactory(model=model, agent=placement.agent, placement=placement)  # the new load
    actions.fail_load(old.pk, "the load did not finish within the cold-start timeout")
    assert Placement.objects.get(pk=placement.pk).state == PlacementState.DOWNLOADING
