"""Every write to fleet state. Views, tasks and admin actions call these and write nothing else."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Avg, Count, Q, Sum
from django.utils import timezone

from agents import events, scheduling
from agents.agent_client import HeartbeatResult
from agents.bulk import update_rows
from agents.choices import (
    UNROUTABLE_AGENT_STATES,
    AgentState,
    CacheLevel,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
    PlacementState,
)
from agents.models import Agent, LoadEvent, Model, Placement
from agents.scheduling import effective_agent_state, health_verdict, summarize_gpus
from nodeagent.protocol import (
    EngineSpec,
    LoadModelRequest,
    LoadModelResponse,
    ModelStatus,
    RegisterRequest,
    UnloadModelResponse,
)

log = logging.getLogger(__name__)

# A placement in one of these states has a load under way.
LOADING_STATES = (PlacementState.DOWNLOADING, PlacementState.LOADING_TO_GPU)
# What one unload may take: stopping an engine waits out its grace period.
UNLOAD_TIMEOUT_SECONDS = 120.0
# A pending step whose task has not started this long after it was queued is sent again (the
# broker was away, or its message was lost with a worker); claiming makes a duplicate harmless.
_RESEND_AFTER = timedelta(seconds=60)
_resent_at: dict[int, float] = {}


def register_agent(request: RegisterRequest) -> tuple[Agent, bool]:
    """Create or refresh the agent named by `request.agent_id`; returns it and whether it is new.

    Idempotent: a restarted agent registers again and updates its row. Takes a
    row lock on the agent.
    """
    gpus = summarize_gpus(request.gpus)
    now = timezone.now()
    with transaction.atomic():
        # The lock orders a registration against a concurrent drain or heartbeat of the
        # same agent, so neither overwrites the other's half of the row.
        agent, created = Agent.objects.select_for_update(no_key=True, of=("self",)).get_or_create(
            agent_id=request.agent_id, defaults={"base_url": request.base_url}
        )
        reported = AgentState(request.state)
        agent.base_url = request.base_url
        agent.version = request.version
        agent.labels = dict(request.labels)
        agent.gpus = [asdict(gpu) for gpu in request.gpus]
        agent.gpu_name = gpus.name
        agent.gpu_count = gpus.count
        agent.gpu_memory_total = gpus.memory_total
        agent.gpu_memory_free = gpus.memory_free
        agent.gpu_utilization = gpus.utilization
        agent.reported_state = reported
        # It just spoke to us, so any earlier verdict of DEGRADED or OFFLINE is over.
        agent.state = effective_agent_state(reported, draining=agent.drained_at is not None)
        agent.last_heartbeat_at = now
        agent.heartbeat_failures = 0
        agent.save()
        events.announce(agents=[agent.pk])
    return agent, created


def drain_agent(agent_id: str) -> Agent:
    """Stop sending new work to the agent; what it serves now finishes. Takes a row lock."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update(no_key=True, of=("self",)).get(agent_id=agent_id)
        if agent.drained_at is None:
            agent.drained_at = timezone.now()
        agent.state = effective_agent_state(
            AgentState(agent.reported_state),
            draining=True,
            health=health_verdict(AgentState(agent.state)),
        )
        agent.save(update_fields=["drained_at", "state", "updated_at"])
        events.announce(agents=[agent.pk])
    return agent


def undrain_agent(agent_id: str) -> Agent:
    """Let the agent take new work again. Takes a row lock."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update(no_key=True, of=("self",)).get(agent_id=agent_id)
        agent.drained_at = None
        agent.state = effective_agent_state(
            AgentState(agent.reported_state),
            draining=False,
            health=health_verdict(AgentState(agent.state)),
        )
        agent.save(update_fields=["drained_at", "state", "updated_at"])
        events.announce(agents=[agent.pk])
    return agent


def replica_failed(placement_pk: int, ready_at: datetime | None, fault: str, message: str) -> None:
    """What the gateway saw of a READY replica before the first byte, written at once, so no
    web process routes to it until a heartbeat says otherwise: an agent that did not answer
    is DEGRADED (one more missed heartbeat than that makes it OFFLINE), one that is stopping
    is DRAINING, and a model the agent no longer serves is FAILED there.

    Locks one row: the agent, or the placement (never both, so no lock order to keep).
    """
    from controlplane.gateway.upstream import Fault

    with transaction.atomic():
        if fault == Fault.NOT_SERVING:
            # Only the READY row the gateway tried: a load that finished since (a new ready_at)
            # is another replica, not this failure's.
            failed = Placement.objects.filter(
                pk=placement_pk, state=PlacementState.READY, ready_at=ready_at
            ).update(
                state=PlacementState.FAILED, inference_endpoint_url="",
                error=f"gateway: {message}"[:4000], updated_at=timezone.now(),
            )  # fmt: skip
            if failed:
                events.announce(placements=[placement_pk])
            return
        agent = (
            Agent.objects.select_for_update(no_key=True, of=("self",))
            .filter(placements__pk=placement_pk)
            .first()
        )
        if agent is None:  # the placement was deleted meanwhile
            return
        health = health_verdict(AgentState(agent.state))
        if fault == Fault.DRAINING:
            agent.reported_state = AgentState.DRAINING
        else:
            agent.heartbeat_failures = max(
                agent.heartbeat_failures, settings.HEARTBEAT_DEGRADED_AFTER
            )
            if health != AgentState.OFFLINE:
                health = AgentState.DEGRADED
        state = effective_agent_state(
            AgentState(agent.reported_state), draining=agent.drained_at is not None, health=health
        )
        if state != agent.state:
            log.warning("agent %s is %s: %s", agent.agent_id, state, message)
        agent.state = state
        agent.save(update_fields=["state", "reported_state", "heartbeat_failures", "updated_at"])
        events.announce(agents=[agent.pk])


def register_catalog_model(
    model_id: str,
    source: str,
    *,
    size_bytes: int,
    revision: str = "",
    engine_args: list[str] | None = None,
    gpu_memory_bytes: int | None = None,
    keep_alive: timedelta | None = None,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    pinned: bool | None = None,
    enabled: bool = True,
) -> tuple[Model, bool]:
    """Add a published model to the catalog, or update its entry; returns it and whether it is new.

    Options left as None keep their current (or default) values. Raises ValidationError
    (writing nothing) for an invalid id, source or replica bounds.
    """
    with transaction.atomic():
        model = (
            Model.objects.select_for_update(no_key=True, of=("self",))
            .filter(model_id=model_id)
            .first()
        )
        created = model is None
        model = model or Model(model_id=model_id)
        model.source, model.revision, model.size_bytes, model.enabled = (
            source,
            revision,
            size_bytes,
            enabled,
        )
        options = {
            "engine_args": engine_args,
            "gpu_memory_bytes": gpu_memory_bytes,
            "keep_alive": keep_alive,
            "min_replicas": min_replicas,
            "max_replicas": max_replicas,
            "pinned": pinned,
        }
        for name, value in options.items():
            if value is not None:
                setattr(model, name, value)
        model.full_clean()
        model.save()
    return model, created


# --- cold starts -----------------------------------------------------------------------------


class NoCapacity(Exception):
    """No agent can take the model now: none is routable, none has room, or every one tried
    has failed to load it within the cold-start timeout."""


def _queue(task_name: str, *args: object) -> None:
    """Send a task once the transaction that wrote its rows commits (never before). A broker
    that is away does not fail the caller: the sweep sends it again (settle_orphaned_steps)."""
    transaction.on_commit(lambda: _send(task_name, *args))


def _send(task_name: str, *args: object) -> None:
    from controlplane.celery import app

    try:
        app.send_task(task_name, args=args)
    except Exception as exc:  # kombu's OperationalError, a socket error: the broker is away
        log.warning("could not queue %s%s (the sweep will): %s", task_name, args, exc)


def ensure_placement(model: Model) -> Placement:
    """A placement that serves `model` or soon will: a READY one, the load under way, or a new
    load on the agent where it can serve soonest. Raises NoCapacity.

    Single flight: the model's row lock orders concurrent callers, so however many cold
    requests arrive at once, the first starts one load and the rest find it.
    """
    with transaction.atomic():
        locked = Model.objects.select_for_update(no_key=True, of=("self",)).get(pk=model.pk)
        placements = list(locked.placements.select_related("agent"))
        usable = [p for p in placements if p.agent.is_routable]
        for state in (PlacementState.READY, *LOADING_STATES):
            found = next((p for p in usable if p.state == state), None)
            if found is not None:
                return found
        return _start_load(locked, placements, LoadTrigger.REQUEST)


def scale_out(model: Model, trigger: str = LoadTrigger.SCALE_OUT) -> Placement | None:
    """Load one more replica of `model` in the background, if `max_replicas` allows and an
    agent without one has room; None when there is nothing to do."""
    with transaction.atomic():
        locked = Model.objects.select_for_update(no_key=True, of=("self",)).get(pk=model.pk)
        placements = list(locked.placements.select_related("agent"))
        active = [
            p
            for p in placements
            if p.agent.is_routable and p.state in (PlacementState.READY, *LOADING_STATES)
        ]
        if len(active) >= locked.max_replicas:
            return None
        try:
            return _start_load(locked, placements, trigger, {p.agent_id for p in active})
        except NoCapacity:
            return None


def load_on_agent(model: Model, agent: Agent) -> Placement:
    """An operator's order: serve `model` on `agent`, stepping idle models down there if its
    GPU memory needs it. Raises NoCapacity when the agent takes no work or has no room."""
    with transaction.atomic():
        locked = Model.objects.select_for_update(no_key=True, of=("self",)).get(pk=model.pk)
        placements = list(locked.placements.select_related("agent"))
        current = next((p for p in placements if p.agent_id == agent.pk), None)
        if current is not None and current.state in (PlacementState.READY, *LOADING_STATES):
            return current
        others = set(Agent.objects.exclude(pk=agent.pk).values_list("pk", flat=True))
        return _start_load(locked, placements, LoadTrigger.OPERATOR, others, recent_failures=False)


def _start_load(
    model: Model,
    placements: Sequence[Placement],
    trigger: str,
    exclude: Iterable[int] = (),
    *,
    recent_failures: bool = True,
) -> Placement:
    """Pick the agent (scheduling.plan_load), mark the placement loading, record the LoadEvent,
    queue the demotions that make room and the load itself. Runs under the model's lock."""
    excluded = set(exclude)
    failed = _recent_failures(model) if recent_failures else []
    excluded |= {event.agent_id for event in failed}
    candidates = _load_candidates(model, placements, excluded)
    plan = scheduling.plan_load(
        candidates, size_bytes=model.size_bytes, gpu_memory_bytes=model.gpu_memory_bytes
    )
    if plan is None:
        if failed:
            raise NoCapacity(
                f"loading {model.model_id} failed on {len(failed)} agent(s); last error: "
                f"{failed[0].error or 'unknown'}"
            )
        raise NoCapacity(f"no agent that takes new work has room for {model.model_id}")
    agent = Agent.objects.get(agent_id=plan.agent_id)
    placement = next((p for p in placements if p.agent_id == agent.pk), None)
    placement = placement or Placement(agent=agent, model=model)
    placement.state = (
        PlacementState.DOWNLOADING
        if placement.cache_level == CacheLevel.NONE
        else PlacementState.LOADING_TO_GPU
    )
    placement.error, placement.bytes_done, placement.inference_endpoint_url = "", 0, ""
    placement.bytes_total = model.size_bytes
    placement.save()
    victims = [
        _begin_unload(victim, CacheLevel.DRAM_CACHED, LoadTrigger.PRESSURE, queue=False).pk
        for victim in Placement.objects.filter(pk__in=plan.victims).select_related("agent", "model")
    ]
    event = LoadEvent.objects.create(
        agent=agent, model=model, placement=placement, kind=LoadEventKind.LOAD, trigger=trigger,
        from_level=placement.cache_level, to_level=CacheLevel.GPU_RESIDENT,
    )  # fmt: skip
    log.info(
        "loading %s on %s (%s, about %.0f s, %d to step down first)",
        model.model_id, agent.agent_id, trigger, plan.estimated_seconds, len(victims),
    )  # fmt: skip
    _queue("agents.tasks.load", event.pk, victims)
    events.announce(placements=[placement.pk], loads=[event.pk])
    return placement


def _recent_failures(model: Model) -> list[LoadEvent]:
    """The model's loads that failed within LOAD_RETRY_BACKOFF_SECONDS, newest first: their
    agents are not tried for it again until then."""
    since = timezone.now() - timedelta(seconds=settings.LOAD_RETRY_BACKOFF_SECONDS)
    return list(
        LoadEvent.objects.filter(
            model=model,
            kind=LoadEventKind.LOAD,
            outcome=LoadOutcome.FAILED,
            finished_at__gte=since,
        ).order_by("-finished_at")
    )


def _load_candidates(
    model: Model, placements: Sequence[Placement], excluded: set[int]
) -> list[scheduling.LoadCandidate]:
    """Every agent that takes new work, as plan_load sees it: a handful of grouped queries,
    whatever the fleet's size."""
    agents = list(
        Agent.objects.exclude(state__in=UNROUTABLE_AGENT_STATES)
        .exclude(pk__in=excluded)
        .only("pk", "agent_id", "gpu_memory_total", "gpu_memory_free")
    )
    if not agents:
        return []
    level = {p.agent_id: p.cache_level for p in placements}
    loading: dict[int, int] = {
        int(agent): int(count)
        for agent, count in Placement.objects.filter(state__in=LOADING_STATES)
        .values_list("agent")
        .annotate(n=Count("pk"))
        .values_list("agent", "n")
    }
    history = _load_history()
    tight = [
        a.pk for a in agents if a.gpu_memory_total and a.gpu_memory_free < model.gpu_memory_bytes
    ]
    residents = _residents(tight)
    return [
        scheduling.LoadCandidate(
            agent_id=agent.agent_id,
            cache_level=level.get(agent.pk, CacheLevel.NONE),
            gpu_memory_total=agent.gpu_memory_total,
            gpu_memory_free=agent.gpu_memory_free,
            loads_in_progress=loading.get(agent.pk, 0),
            history=history.get(agent.pk, scheduling.LoadHistory()),
            residents=tuple(residents.get(agent.pk, ())),
        )
        for agent in agents
    ]


def _load_history() -> dict[int, scheduling.LoadHistory]:
    """Each agent's observed download bandwidth, engine start and wake times (past loads)."""
    rows = (
        LoadEvent.objects.filter(kind=LoadEventKind.LOAD, outcome=LoadOutcome.SUCCEEDED)
        .values("agent")
        .annotate(
            downloaded=Sum("bytes_downloaded", filter=Q(download_seconds__gt=0)),
            download_seconds=Sum("download_seconds", filter=Q(download_seconds__gt=0)),
            engine_start=Avg("engine_start_seconds", filter=Q(from_level__in=[
                CacheLevel.NVME_CACHED, CacheLevel.NONE])),
            wake=Avg("engine_start_seconds", filter=Q(from_level=CacheLevel.DRAM_CACHED)),
        )
    )  # fmt: skip
    return {
        int(row["agent"]): scheduling.LoadHistory(
            bytes_per_second=(
                row["downloaded"] / row["download_seconds"]
                if row["downloaded"] and row["download_seconds"]
                else None
            ),
            engine_start_seconds=row["engine_start"],
            wake_seconds=row["wake"],
        )
        for row in rows
    }


def _residents(agent_pks: list[int]) -> dict[int, list[scheduling.Resident]]:
    """The GPU-resident models of these agents, and which could step down to make room."""
    if not agent_pks:
        return {}
    now = timezone.now()
    resident = list(
        Placement.objects.filter(
            agent__in=agent_pks, state=PlacementState.READY, cache_level=CacheLevel.GPU_RESIDENT
        ).select_related("model")
    )
    on_gpu: dict[int, int] = {
        int(model): int(count)
        for model, count in Placement.objects.filter(
            model__in={p.model_id for p in resident},
            state=PlacementState.READY,
            cache_level=CacheLevel.GPU_RESIDENT,
        )
        .values_list("model")
        .annotate(n=Count("pk"))
        .values_list("model", "n")
    }
    found: dict[int, list[scheduling.Resident]] = {}
    for p in resident:
        evictable = (
            not p.model.pinned
            and not p.requests_in_flight
            and not p.requests_waiting
            and on_gpu.get(p.model_id, 0) > p.model.min_replicas
        )
        found.setdefault(p.agent_id, []).append(
            scheduling.Resident(p.pk, p.model.gpu_memory_bytes, _idle_seconds(p, now), evictable)
        )
    return found


def _idle_seconds(placement: Placement, now: datetime) -> float:
    since = placement.last_used_at or placement.ready_at or placement.updated_at
    return (now - since).total_seconds()


@dataclass(frozen=True)
class LoadJob:
    """What the load task needs to call the agent."""

    event_id: int
    agent_url: str
    request: LoadModelRequest


def _claim_pending(event_id: int) -> LoadEvent | None:
    """Mark a pending load or unload started (its queue time ends); None when it is not
    pending any more, e.g. a redelivered task whose work another worker already did."""
    with transaction.atomic():
        # of=self: PostgreSQL would otherwise lock the joined agent and model rows too, in an
        # order of its own, and deadlock with a sweep or heartbeat round locking those.
        event = (
            LoadEvent.objects.select_for_update(no_key=True, of=("self",))
            .select_related("agent", "model")
            .filter(pk=event_id, outcome=LoadOutcome.PENDING, started_at__isnull=True)
            .first()
        )
        if event is None:
            return None
        event.started_at = timezone.now()
        event.queue_seconds = (event.started_at - event.queued_at).total_seconds()
        event.save(update_fields=["started_at", "queue_seconds"])
    return event


def begin_load(event_id: int) -> LoadJob | None:
    """Mark the load started (its queue time ends); None when it is not pending any more,
    e.g. a redelivered task whose load another worker already finished."""
    event = _claim_pending(event_id)
    if event is None:
        return None
    model = event.model
    request = LoadModelRequest(
        model_id=model.model_id,
        source=model.source,
        revision=model.revision,
        engine=EngineSpec(args=tuple(model.engine_args)),
    )
    return LoadJob(event.pk, event.agent.base_url, request)


def finish_load(event_id: int, response: LoadModelResponse) -> Placement | None:
    """The agent serves the model: the placement turns READY with its endpoint."""
    now = timezone.now()
    with transaction.atomic():
        event = (
            LoadEvent.objects.select_for_update(no_key=True, of=("self",))
            .select_related("model")
            .get(pk=event_id)
        )
        timings = response.timings
        event.outcome, event.finished_at = LoadOutcome.SUCCEEDED, now
        event.download_seconds = timings.download_seconds
        event.engine_start_seconds = timings.engine_start_seconds or timings.wake_seconds
        event.bytes_downloaded = event.model.size_bytes if timings.download_seconds else 0
        event.save()
        placement = (
            Placement.objects.select_for_update(no_key=True, of=("self",))
            .filter(pk__in=_placement_of(event))
            .first()
        )
        if placement is None:
            return None
        placement.state, placement.cache_level = PlacementState.READY, CacheLevel.GPU_RESIDENT
        placement.inference_endpoint_url = response.inference_endpoint_url
        placement.ready_at = placement.last_used_at = now
        placement.bytes_done = placement.bytes_total
        placement.error = ""
        placement.save()
        events.announce(placements=[placement.pk], loads=[event.pk])
    return placement


def fail_load(event_id: int, error: str) -> Placement | None:
    """The load failed: record why, and try the next best agent while attempts remain.
    Returns the retry's placement, if one was started."""
    with transaction.atomic():
        event = (
            LoadEvent.objects.select_for_update(no_key=True, of=("self",))
            .select_related("model")
            .get(pk=event_id)
        )
        if event.outcome != LoadOutcome.PENDING:
            return None
        model = Model.objects.select_for_update(no_key=True, of=("self",)).get(pk=event.model_id)
        event.outcome, event.finished_at, event.error = LoadOutcome.FAILED, timezone.now(), error
        event.save()
        # Only while the placement is this load's: a later load of it (after a heartbeat saw
        # it gone) is not undone by an old one failing.
        Placement.objects.filter(pk__in=_placement_of(event), state__in=LOADING_STATES).exclude(
            load_events__queued_at__gt=event.queued_at
        ).update(state=PlacementState.FAILED, error=error[:4000], updated_at=timezone.now())
        events.announce(placements=_placement_of(event), loads=[event.pk])
        log.warning("load of %s on agent %s failed: %s", model.model_id, event.agent_id, error)
        placements = list(model.placements.select_related("agent"))
        if len(_recent_failures(model)) >= settings.LOAD_ATTEMPTS:
            return None
        if any(p.state in LOADING_STATES and p.agent.is_routable for p in placements):
            return None  # another load of it is under way already
        try:
            return _start_load(model, placements, LoadTrigger.FAILURE)
        except NoCapacity:
            return None


def _placement_of(event: LoadEvent) -> list[int]:
    """The event's placement as a filter; empty when an operator deleted it meanwhile."""
    return [] if event.placement_id is None else [event.placement_id]


def record_first_token(placement_id: int) -> None:
    """The first answer after a cold start reached its client: the load's last phase."""
    now = timezone.now()
    event = (
        LoadEvent.objects.filter(
            placement_id=placement_id,
            kind=LoadEventKind.LOAD,
            outcome=LoadOutcome.SUCCEEDED,
            first_token_seconds__isnull=True,
        )
        .order_by("-queued_at")
        .first()
    )
    if event is not None and event.finished_at is not None:
        LoadEvent.objects.filter(pk=event.pk, first_token_seconds__isnull=True).update(
            first_token_seconds=(now - event.finished_at).total_seconds()
        )
        events.announce(loads=[event.pk])


def settle_orphaned_steps() -> int:
    """Close the loads and unloads whose tasks died or never ran (a worker killed mid-task, a
    broker that was away), so nothing stays pending: a step the agent did anyway (a heartbeat
    saw it, `_reconcile`) succeeds, one never started is sent again, and one pending past its
    timeout fails (a load moves on to the next agent; an unload leaves the model serving).
    Returns how many it closed."""
    now = timezone.now()
    pending = list(
        LoadEvent.objects.filter(outcome=LoadOutcome.PENDING).select_related("placement")
    )
    closed = 0
    for event in pending:
        placement = event.placement
        if placement is not None and _done_anyway(event, placement):
            closed += _close_as_done(event.pk)
        elif now - event.queued_at > _timeout(event):
            closed += 1
            if event.kind == LoadEventKind.LOAD:
                fail_load(event.pk, "the load did not finish within the cold-start timeout")
            else:
                fail_unload(event.pk, "the unload did not finish within its timeout")
        elif event.started_at is None and now - event.queued_at > _RESEND_AFTER:
            _resend(event)
    return closed


def _done_anyway(event: LoadEvent, placement: Placement) -> bool:
    if event.kind == LoadEventKind.LOAD:
        return placement.state == PlacementState.READY
    return placement.state != PlacementState.UNLOADING


def _timeout(event: LoadEvent) -> timedelta:
    seconds = (
        settings.COLD_START_TIMEOUT_SECONDS
        if event.kind == LoadEventKind.LOAD
        else UNLOAD_TIMEOUT_SECONDS
    )
    return timedelta(seconds=seconds + 60)


def _close_as_done(event_id: int) -> int:
    """A pending step the agent finished though its task did not say (it died): succeeded,
    without the phases only the task knew. Locks the event; its task, should it still be
    alive, writes its own outcome over this one."""
    with transaction.atomic():
        event = (
            LoadEvent.objects.select_for_update(no_key=True, of=("self",))
            .select_related("placement")
            .filter(pk=event_id, outcome=LoadOutcome.PENDING)
            .first()
        )
        if event is None or event.placement is None:
            return 0
        event.outcome, event.finished_at = LoadOutcome.SUCCEEDED, timezone.now()
        if event.kind == LoadEventKind.UNLOAD:
            event.to_level = event.placement.cache_level
            if event.placement.state == PlacementState.FAILED:  # the engine died stopping
                event.outcome, event.error = LoadOutcome.FAILED, event.placement.error[:4000]
        event.save(update_fields=["outcome", "finished_at", "to_level", "error"])
        events.announce(loads=[event.pk])
    log.info("%s %s finished on its agent; its task never said", event.kind.lower(), event_id)
    return 1


def _resend(event: LoadEvent) -> None:
    last = _resent_at.get(event.pk)
    if last is not None and time.monotonic() - last < _RESEND_AFTER.total_seconds():
        return
    _resent_at[event.pk] = time.monotonic()
    task = "agents.tasks.load" if event.kind == LoadEventKind.LOAD else "agents.tasks.unload"
    log.warning("%s %s was never started; queueing it again", event.kind.lower(), event.pk)
    _send(task, event.pk)


# --- stepping down ---------------------------------------------------------------------------


def _begin_unload(placement: Placement, to_level: str, trigger: str, *, queue: bool) -> LoadEvent:
    """Take the placement out of routing at once and record the step down; the agent is called
    by the unload task (queued here, or run first by the load it makes room for)."""
    event = LoadEvent.objects.create(
        agent=placement.agent, model=placement.model, placement=placement,
        kind=LoadEventKind.UNLOAD, trigger=trigger, from_level=placement.cache_level,
        to_level=to_level,
    )  # fmt: skip
    placement.state = PlacementState.UNLOADING
    placement.save(update_fields=["state", "updated_at"])
    events.announce(placements=[placement.pk], loads=[event.pk])
    if queue:
        _queue("agents.tasks.unload", event.pk)
    return event


class CannotStepDown(Exception):
    """The placement is not where it can step down to the level asked for (yet)."""


# The ladder, top first: a step goes to a level further down.
_LADDER = [CacheLevel.GPU_RESIDENT, CacheLevel.DRAM_CACHED, CacheLevel.NVME_CACHED, CacheLevel.NONE]


def unload(placement: Placement, to_level: str, trigger: str = LoadTrigger.OPERATOR) -> LoadEvent:
    """Step a placement down to `to_level` (DRAM_CACHED, NVME_CACHED or NONE). Raises
    CannotStepDown while it loads or unloads, or when it is not above that level."""
    with transaction.atomic():
        locked = (
            Placement.objects.select_for_update(no_key=True, of=("self",))
            .select_related("agent", "model")
            .get(pk=placement.pk)
        )
        if to_level not in _LADDER[1:]:
            raise CannotStepDown(f"{to_level} is not a level to step down to")
        if locked.state in (*LOADING_STATES, PlacementState.UNLOADING):
            raise CannotStepDown(f"{locked} is {locked.get_state_display().lower()}; wait for it")
        if _LADDER.index(CacheLevel(locked.cache_level)) >= _LADDER.index(CacheLevel(to_level)):
            raise CannotStepDown(f"{locked} is at {locked.cache_level}, not above {to_level}")
        return _begin_unload(locked, to_level, trigger, queue=True)


@dataclass(frozen=True)
class UnloadJob:
    event_id: int
    agent_url: str
    model_id: str
    to_level: str


def begin_unload(event_id: int) -> UnloadJob | None:
    event = _claim_pending(event_id)
    if event is None:
        return None
    return UnloadJob(event.pk, event.agent.base_url, event.model.model_id, event.to_level)


def finish_unload(event_id: int, response: UnloadModelResponse) -> None:
    """The agent stepped the model down, maybe further than asked (an engine that cannot sleep)."""
    with transaction.atomic():
        event = LoadEvent.objects.select_for_update(no_key=True, of=("self",)).get(pk=event_id)
        event.outcome, event.finished_at = LoadOutcome.SUCCEEDED, timezone.now()
        event.to_level = response.cache_level
        event.error = response.note
        event.save()
        Placement.objects.filter(
            pk__in=_placement_of(event), state=PlacementState.UNLOADING
        ).update(
            state=PlacementState.UNLOADED,
            cache_level=response.cache_level,
            inference_endpoint_url="",
            updated_at=timezone.now(),
        )
        events.announce(placements=_placement_of(event), loads=[event.pk])


def fail_unload(event_id: int, error: str) -> None:
    """The agent refused or could not be reached: the placement keeps serving as it did
    (a heartbeat corrects it if the agent is gone)."""
    with transaction.atomic():
        event = LoadEvent.objects.select_for_update(no_key=True, of=("self",)).get(pk=event_id)
        if event.outcome != LoadOutcome.PENDING:  # closed already (settle_orphaned_steps)
            return
        event.outcome, event.finished_at, event.error = (
            LoadOutcome.FAILED,
            timezone.now(),
            error,
        )
        event.save()
        Placement.objects.filter(
            pk__in=_placement_of(event), state=PlacementState.UNLOADING
        ).update(state=PlacementState.READY, updated_at=timezone.now())
        events.announce(placements=_placement_of(event), loads=[event.pk])


def sweep() -> list[LoadEvent]:
    """Beat's eviction sweep: step idle models down the ladder (scheduling.plan_sweep), top
    models up to their min_replicas, and fail loads a dead worker left pending."""
    settle_orphaned_steps()
    now = timezone.now()
    placements = list(
        Placement.objects.exclude(agent__state__in=UNROUTABLE_AGENT_STATES)
        .filter(
            Q(state=PlacementState.READY, cache_level=CacheLevel.GPU_RESIDENT)
            | Q(cache_level=CacheLevel.DRAM_CACHED, state=PlacementState.UNLOADED)
        )
        .select_related("model", "agent")
    )
    facts = [
        scheduling.PlacementFacts(
            placement_id=p.pk, model=p.model.model_id, agent_id=p.agent.agent_id,
            cache_level=p.cache_level, ready=p.state == PlacementState.READY,
            pinned=p.model.pinned, keep_alive_seconds=p.model.keep_alive.total_seconds(),
            min_replicas=p.model.min_replicas, idle_seconds=_idle_seconds(p, now),
            busy=bool(p.requests_in_flight or p.requests_waiting),
        )
        for p in placements
    ]  # fmt: skip
    memory = {
        p.agent.agent_id: scheduling.AgentMemory(
            p.agent.agent_id, p.agent.gpu_memory_total, p.agent.gpu_memory_free
        )
        for p in placements
    }
    plan = scheduling.plan_sweep(
        facts, list(memory.values()), pressure_percent=settings.GPU_MEMORY_PRESSURE_PERCENT
    )
    by_pk = {p.pk: p for p in placements}
    steps = []
    for demotion in plan:
        with transaction.atomic():
            placement = (
                Placement.objects.select_for_update(no_key=True, of=("self",))
                .select_related("agent", "model")
                .get(pk=demotion.placement_id)
            )
            if placement.state != by_pk[demotion.placement_id].state:
                continue  # it changed since the plan was made: next sweep decides again
            steps.append(_begin_unload(placement, demotion.to_level, demotion.trigger, queue=True))
    for model in Model.objects.filter(enabled=True, min_replicas__gt=0):
        scale_out(model, LoadTrigger.SCALE_OUT)
    return steps


# --- heartbeats ------------------------------------------------------------------------------


def apply_heartbeats(results: Sequence[HeartbeatResult]) -> None:
    """Write a round of heartbeat polls: agents that answered are refreshed and their
    placements reconciled with what they report; agents that did not count a miss and
    become DEGRADED, then OFFLINE."""
    with transaction.atomic():
        _apply_heartbeats(results)


def _apply_heartbeats(results: Sequence[HeartbeatResult]) -> None:
    # Row locks from read to write: a load that fails, an unload that finishes or a drain
    # between the two would otherwise be overwritten with what the agent said before it.
    agents = {
        agent.pk: agent
        for agent in Agent.objects.select_for_update(no_key=True, of=("self",))
        .filter(pk__in=[result.agent_pk for result in results])
        .order_by("pk")
    }
    catalog = dict(Model.objects.values_list("model_id", "pk"))
    placements: dict[int, dict[int, Placement]] = {}
    for placement in (
        Placement.objects.select_for_update(no_key=True, of=("self",))
        .filter(agent__in=agents)
        .order_by("pk")
    ):
        placements.setdefault(placement.agent_id, {})[placement.model_id] = placement
    now = timezone.now()
    changed_agents: list[Agent] = []
    changed: list[Placement] = []
    created: list[Placement] = []
    for result in results:
        agent = agents.get(result.agent_pk)
        if agent is None:
            continue  # deleted while it was polled
        if result.response is None:
            _missed(agent, result.error)
        else:
            _answered(agent, result, now)
            mine = placements.get(agent.pk, {})
            seen = set()
            polled_at = datetime.fromtimestamp(result.polled_at, UTC)
            for status in result.response.models:
                model_pk = catalog.get(status.model_id)
                if model_pk is None:
                    continue  # not in the catalog (any more): nothing routes to it
                seen.add(model_pk)
                known = mine.get(model_pk)
                if known is None:
                    new = Placement(agent=agent, model_id=model_pk)
                    _reconcile(new, status)
                    created.append(new)
                elif known.updated_at < polled_at:  # else written since: that is newer
                    _reconcile(known, status)
                    changed.append(known)
            for model_pk, placement in mine.items():
                fresh = placement.updated_at >= polled_at
                if model_pk not in seen and not fresh and _lost(placement, now):
                    changed.append(placement)
        changed_agents.append(agent)
    update_rows(changed_agents, _HEARTBEAT_AGENT_FIELDS)
    update_rows(changed, _HEARTBEAT_PLACEMENT_FIELDS)
    Placement.objects.bulk_create(created, ignore_conflicts=True)
    events.announce(
        agents=[agent.pk for agent in changed_agents], placements=[p.pk for p in changed]
    )


_HEARTBEAT_AGENT_FIELDS = [
    "state", "reported_state", "version", "gpus", "gpu_name", "gpu_count", "gpu_memory_total",
    "gpu_memory_free", "gpu_utilization", "engine_queue_length", "last_heartbeat_at",
    "heartbeat_failures", "updated_at",
]  # fmt: skip
_HEARTBEAT_PLACEMENT_FIELDS = [
    "state", "cache_level", "inference_endpoint_url", "bytes_done", "bytes_total",
    "kv_cache_hit_rate", "kv_cache_usage", "requests_in_flight", "requests_waiting",
    "last_used_at", "error", "updated_at",
]  # fmt: skip


def _answered(agent: Agent, result: HeartbeatResult, now: datetime) -> None:
    beat = result.response
    assert beat is not None
    gpus = summarize_gpus(beat.gpus)
    reported = AgentState(beat.state) if beat.state in AgentState.values else AgentState.IDLE
    agent.reported_state = reported
    agent.state = effective_agent_state(reported, draining=agent.drained_at is not None)
    agent.version = beat.version
    agent.gpus = [asdict(gpu) for gpu in beat.gpus]
    agent.gpu_name, agent.gpu_count = gpus.name, gpus.count
    agent.gpu_memory_total, agent.gpu_memory_free = gpus.memory_total, gpus.memory_free
    agent.gpu_utilization = gpus.utilization
    agent.engine_queue_length = beat.vllm_queue_length
    agent.last_heartbeat_at, agent.heartbeat_failures, agent.updated_at = now, 0, now


def _missed(agent: Agent, error: str) -> None:
    agent.heartbeat_failures += 1
    verdict = scheduling.missed_heartbeat_verdict(
        agent.heartbeat_failures,
        degraded_after=settings.HEARTBEAT_DEGRADED_AFTER,
        offline_after=settings.HEARTBEAT_OFFLINE_AFTER,
    )
    state = effective_agent_state(
        AgentState(agent.reported_state), draining=agent.drained_at is not None, health=verdict
    )
    if state != agent.state:
        log.warning("agent %s is %s: %s", agent.agent_id, state, error)
    agent.state, agent.updated_at = state, timezone.now()


def _reconcile(placement: Placement, status: ModelStatus) -> None:
    """Trust what the agent reports of a model it has, except the state of a step the control
    plane has under way: a pending load ends READY or FAILED by its task (the agent may not
    have started it yet), and a pending unload ends by its task too."""
    pending = placement.state in LOADING_STATES or placement.state == PlacementState.UNLOADING
    # What the agent reports as the step's own outcome is the truth even while the step is
    # pending here: its task may have died (the sweep then closes its LoadEvent). An unload's
    # outcome is a level below the one it left (still cache_level while UNLOADING): UNLOADED
    # alone is also what a model in host RAM says before it steps down to disk.
    done = (placement.state in LOADING_STATES and status.cache_state == PlacementState.READY) or (
        placement.state == PlacementState.UNLOADING
        and status.cache_state in (PlacementState.UNLOADED, PlacementState.FAILED)
        and _below(status.cache_level, placement.cache_level)
    )
    if done:
        pending = False
        if status.cache_state == PlacementState.READY:
            placement.ready_at = timezone.now()
    if status.cache_state in PlacementState.values and (
        not pending or status.cache_state in LOADING_STATES
    ):
        placement.state = status.cache_state
    if status.cache_level in CacheLevel.values:
        placement.cache_level = status.cache_level
    if not pending:
        placement.inference_endpoint_url = status.inference_endpoint_url
    placement.bytes_done, placement.bytes_total = status.bytes_done, status.bytes_total
    placement.kv_cache_hit_rate, placement.kv_cache_usage = (
        status.kv_cache_hit_rate,
        status.kv_cache_usage,
    )
    placement.requests_in_flight = status.requests_in_flight
    placement.requests_waiting = status.requests_waiting
    if status.last_used_at:
        placement.last_used_at = datetime.fromisoformat(status.last_used_at)
    if not pending:
        placement.error = status.error[:4000]
    placement.updated_at = timezone.now()


def _below(level: str, than: str) -> bool:
    """Whether `level` is further down the eviction ladder than `than`."""
    if level not in CacheLevel.values or than not in CacheLevel.values:
        return False
    return _LADDER.index(CacheLevel(level)) > _LADDER.index(CacheLevel(than))


# A load queued this recently may not have reached its agent yet: its absence from a
# heartbeat says nothing.
_LOAD_GRACE = timedelta(seconds=30)


def _lost(placement: Placement, now: datetime) -> bool:
    """A placement the agent no longer reports: marked gone (unless its load is just queued)."""
    if placement.state in LOADING_STATES and now - placement.updated_at < _LOAD_GRACE:
        return False
    if placement.state == PlacementState.UNLOADED and placement.cache_level == CacheLevel.NONE:
        return False
    placement.state, placement.cache_level = PlacementState.UNLOADED, CacheLevel.NONE
    placement.inference_endpoint_url, placement.updated_at = "", now
    return True
