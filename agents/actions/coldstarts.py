"""Cold starts: where a model is loaded (scheduling.plan_load), single flight per model,
and the retry on the next agent after a load failed. The load task's own steps, once a load
is queued, are in `loads`."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Q
from django.utils import timezone

from agents import events, scheduling, transitions
from agents.actions import steps, unloads
from agents.choices import (
    UNROUTABLE_AGENT_STATES,
    CacheLevel,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
    PlacementState,
)
from agents.models import Agent, LoadEstimate, LoadEvent, Model, Placement
from agents.transitions import Event
from controlplane import traces
from nodeagent.protocol import order_sources, source_store

log = logging.getLogger(__name__)


class NoCapacity(Exception):
    """No agent can take the model now: none is routable, none has room, or every one tried
    has failed to load it within the cold-start timeout (`loads_failed`). The message is for
    operators: it names agents and the last load error."""

    def __init__(
        self, message: str, *, loads_failed: bool = False, idle_only: bool = False
    ) -> None:
        super().__init__(message)
        self.loads_failed = loads_failed
        self.idle_only = idle_only  # no idle capacity, for a load that may take only that


def _served_by(model: Model) -> Model:
    """The model whose engines load: a LoRA adapter's base (an adapter has none of its own)."""
    return model.base if model.base is not None else model


def ensure_placement(
    model: Model, trigger: str = LoadTrigger.REQUEST, min_idle_seconds: float = 0.0
) -> Placement:
    """A placement that serves `model` or soon will: a READY one, the load under way, or a new
    load on the agent where it can serve soonest. Raises NoCapacity.

    A new load may step down only models idle for `min_idle_seconds` at least: a batch that
    waits for idle capacity (gateway.batchrun) takes free GPU memory and models nobody has
    used for a while, never one that interactive traffic would have to cold-start again.

    Single flight: the model's row lock orders concurrent callers, so however many cold
    requests arrive at once, the first starts one load and the rest find it.
    """
    model = _served_by(model)
    with transaction.atomic():
        locked = Model.objects.select_for_update(no_key=True, of=("self",)).get(pk=model.pk)
        placements = list(locked.placements.select_related("agent"))
        usable = [p for p in placements if p.agent.is_routable]
        for state in (PlacementState.READY, *steps.LOADING_STATES):
            found = next((p for p in usable if p.state == state), None)
            if found is not None:
                return found
        return _start_load(locked, placements, trigger, min_idle_seconds=min_idle_seconds)


def scale_out(model: Model, trigger: str = LoadTrigger.SCALE_OUT) -> Placement | None:
    """Load one more replica of `model` in the background, if `max_replicas` allows and an
    agent without one has room; None when there is nothing to do."""
    model = _served_by(model)
    with transaction.atomic():
        locked = Model.objects.select_for_update(no_key=True, of=("self",)).get(pk=model.pk)
        placements = list(locked.placements.select_related("agent"))
        active = [
            p
            for p in placements
            if p.agent.is_routable and p.state in (PlacementState.READY, *steps.LOADING_STATES)
        ]
        if len(active) >= locked.max_replicas:
            return None
        try:
            return _start_load(locked, placements, trigger, {p.agent_id for p in active})
        except NoCapacity:
            return None


def load_on_agent(model: Model, agent: Agent) -> Placement:
    """An operator's order: serve `model` on `agent`, stepping idle models down there if its
    GPU memory needs it. Raises NoCapacity when the agent takes no work or has no room, or
    when the model has its max_replicas on GPUs already: the sweep would step the extra one
    down again (excess replicas), so the order is refused, saying what to raise."""
    model = _served_by(model)
    with transaction.atomic():
        locked = Model.objects.select_for_update(no_key=True, of=("self",)).get(pk=model.pk)
        placements = list(locked.placements.select_related("agent"))
        current = next((p for p in placements if p.agent_id == agent.pk), None)
        if current is not None and current.state in (PlacementState.READY, *steps.LOADING_STATES):
            return current
        on_gpu = [p for p in placements if _on_gpu_or_going(p)]
        if len(on_gpu) >= locked.max_replicas:
            raise NoCapacity(
                f"{locked.model_id} has {len(on_gpu)} replica(s) on GPUs or loading "
                f"({', '.join(sorted(p.agent.agent_id for p in on_gpu))}), its max_replicas: "
                f"raise max_replicas to serve it on {agent.agent_id} too"
            )
        others = set(Agent.objects.exclude(pk=agent.pk).values_list("pk", flat=True))
        return _start_load(locked, placements, LoadTrigger.OPERATOR, others, recent_failures=False)


def _on_gpu_or_going(placement: Placement) -> bool:
    """A replica that counts against max_replicas, as the sweep counts them: on an agent that
    takes work, serving from a GPU or loading onto one."""
    if placement.agent.state in UNROUTABLE_AGENT_STATES:
        return False
    if placement.state in steps.LOADING_STATES:
        return True
    return (
        placement.state == PlacementState.READY and placement.cache_level == CacheLevel.GPU_RESIDENT
    )


def _start_load(
    model: Model,
    placements: Sequence[Placement],
    trigger: str,
    exclude: Iterable[int] = (),
    *,
    recent_failures: bool = True,
    min_idle_seconds: float = 0.0,
) -> Placement:
    """Pick the agent (scheduling.plan_load), mark the placement loading, record the LoadEvent,
    queue the demotions that make room and the load itself. Runs under the model's lock."""
    excluded = set(exclude)
    failed = failed_recently(model) if recent_failures else []
    excluded |= {event.agent_id for event in failed}
    candidates = _load_candidates(model, placements, excluded, min_idle_seconds)
    plan = scheduling.plan_load(
        candidates, size_bytes=model.size_bytes, gpu_memory_bytes=model.gpu_memory_bytes
    )
    if plan is None:
        if failed:
            raise NoCapacity(
                f"loading {model.model_id} failed on {len(failed)} agent(s); last error: "
                f"{failed[0].error or 'unknown'}",
                loads_failed=True,
            )
        if min_idle_seconds > 0:
            raise NoCapacity(
                f"no agent has room for {model.model_id} without stepping down a model used "
                f"in the last {min_idle_seconds:g} s{_unroutable_agents()}",
                idle_only=True,
            )
        raise NoCapacity(
            f"no agent that takes new work has room for {model.model_id}{_unroutable_agents()}"
        )
    agent = Agent.objects.get(agent_id=plan.agent_id)
    placement, victims_locked = _lock_target_and_victims(model, agent, plan.victims)
    if placement.state in (PlacementState.READY, *steps.LOADING_STATES):
        return placement  # a heartbeat found it serving (or loading) there meanwhile
    if placement.state == PlacementState.UNLOADING:
        raise NoCapacity(f"{placement} is stepping down; it can load again once that is done")
    transitions.move(
        placement, Event.LOAD_REQUESTED, transitions.loading_state(placement.cache_level)
    )
    placement.error, placement.bytes_done, placement.inference_endpoint_url = "", 0, ""
    placement.bytes_total = model.size_bytes
    placement.save()
    victims = [
        unloads.begin_step_down(
            victim, CacheLevel.DRAM_CACHED, LoadTrigger.PRESSURE, queue=False
        ).pk
        for victim in victims_locked
        if victim.state == PlacementState.READY  # else it changed since the plan: leave it
    ]
    trace_id, span_id = traces.cold_start_ids()
    event = LoadEvent.objects.create(
        agent=agent, model=model, placement=placement, kind=LoadEventKind.LOAD, trigger=trigger,
        from_level=placement.cache_level, to_level=CacheLevel.GPU_RESIDENT,
        trace_id=trace_id, span_id=span_id,
    )  # fmt: skip
    log.info(
        "loading %s on %s (%s, about %.0f s, %d to step down first)",
        model.model_id, agent.agent_id, trigger, plan.estimated_seconds, len(victims),
    )  # fmt: skip
    steps.queue("agents.tasks.load", event.pk, victims,
                headers=traces.load_task_headers(trace_id, span_id))  # fmt: skip
    events.announce(placements=[placement.pk], loads=[event.pk])
    return placement


def _unroutable_agents() -> str:
    """What the agents that take no new work are, for the refusal: " (1 DEGRADED)"."""
    counts = (
        Agent.objects.filter(state__in=UNROUTABLE_AGENT_STATES)
        .values_list("state")
        .annotate(n=Count("pk"))
        .order_by("state")
    )
    said = ", ".join(f"{n} {state}" for state, n in counts)
    return f" (agents not taking work: {said})" if said else ""


def _lock_target_and_victims(
    model: Model, agent: Agent, victims: Sequence[int]
) -> tuple[Placement, list[Placement]]:
    """The placement to load and the victims, locked by primary key (the lock order): the rows
    that exist first, then, when the target is missing, its insert, whose key is the highest
    (as a heartbeat round inserts its new rows after locking the existing ones). A heartbeat
    may insert the same row at the same moment (it reports files the agent has): the insert
    ignores the conflict and the lock finds whichever row won."""

    def lock(where: Q) -> list[Placement]:
        return list(
            Placement.objects.select_for_update(no_key=True, of=("self",))
            .select_related("agent", "model")
            .filter(where)
            .order_by("pk")
        )

    locked = lock(Q(agent=agent, model=model) | Q(pk__in=victims))
    target = next((p for p in locked if p.agent_id == agent.pk and p.model_id == model.pk), None)
    if target is None:
        # A row nobody has seen yet: what a placement is before any load (transitions: NEW).
        Placement.objects.bulk_create(
            [Placement(agent=agent, model=model, state=PlacementState.UNLOADED)],
            ignore_conflicts=True,
        )
        target = lock(Q(agent=agent, model=model))[0]
    return target, [p for p in locked if p is not target]


def failed_recently(model: Model) -> list[LoadEvent]:
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


def _history(estimate: LoadEstimate | None, model: Model, agent: Agent) -> scheduling.LoadHistory:
    """What the agent's loads showed, its download bandwidth the one observed from the source
    it will read this model from (the nearest: protocol.order_sources)."""
    if estimate is None:
        return scheduling.LoadHistory()
    store = source_store(order_sources(model.sources, agent.labels or {})[0].uri)
    return scheduling.LoadHistory(
        scheduling.download_rate(
            estimate.bytes_per_second, estimate.source_bytes_per_second or {}, store
        ),
        estimate.engine_start_seconds,
        estimate.wake_seconds,
    )


def _load_candidates(
    model: Model,
    placements: Sequence[Placement],
    excluded: set[int],
    min_idle_seconds: float = 0.0,
) -> list[scheduling.LoadCandidate]:
    """Every agent that takes new work, as plan_load sees it: a handful of grouped queries,
    whatever the fleet's size."""
    agents = list(
        Agent.objects.exclude(state__in=UNROUTABLE_AGENT_STATES)
        .exclude(pk__in=excluded)
        .only(
            "pk",
            "agent_id",
            "labels",
            "gpu_memory_total",
            "gpu_memory_free",
        )
    )
    if not agents:
        return []
    level = {p.agent_id: p.cache_level for p in placements}
    loading: dict[int, int] = {
        int(agent): int(count)
        for agent, count in Placement.objects.filter(state__in=steps.LOADING_STATES)
        .values_list("agent")
        .annotate(n=Count("pk"))
        .values_list("agent", "n")
    }
    estimates = {
        estimate.agent_id: estimate
        for estimate in LoadEstimate.objects.filter(agent__in=[a.pk for a in agents])
    }
    tight = [
        a.pk for a in agents if a.gpu_memory_total and a.gpu_memory_free < model.gpu_memory_bytes
    ]
    residents = _residents(tight, min_idle_seconds)
    return [
        scheduling.LoadCandidate(
            agent_id=agent.agent_id,
            cache_level=level.get(agent.pk, CacheLevel.NONE),
            gpu_memory_total=agent.gpu_memory_total,
            gpu_memory_free=agent.gpu_memory_free,
            loads_in_progress=loading.get(agent.pk, 0),
            history=_history(estimates.get(agent.pk), model, agent),
            residents=tuple(residents.get(agent.pk, ())),
        )
        for agent in agents
    ]


def _residents(
    agent_pks: list[int], min_idle_seconds: float = 0.0
) -> dict[int, list[scheduling.Resident]]:
    """The GPU-resident models of these agents, and which could step down to make room (only
    those idle for `min_idle_seconds` at least)."""
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
        idle = steps.idle_seconds(p, now)
        evictable = (
            not p.model.pinned
            and not p.requests_in_flight
            and not p.requests_waiting
            and on_gpu.get(p.model_id, 0) > p.model.min_replicas
            and idle >= min_idle_seconds
        )
        found.setdefault(p.agent_id, []).append(
            scheduling.Resident(p.pk, p.model.gpu_memory_bytes, idle, evictable)
        )
    return found


def retry_load(model_pk: int) -> Placement | None:
    """After a failed load: the next best agent, while attempts remain and no other load of
    the model is under way. Locks the model, then placements (as every cold start does)."""
    with transaction.atomic():
        model = (
            Model.objects.select_for_update(no_key=True, of=("self",)).filter(pk=model_pk).first()
        )
        if model is None:  # deleted meanwhile
            return None
        placements = list(model.placements.select_related("agent"))
        if len(failed_recently(model)) >= settings.LOAD_ATTEMPTS:
            return None
        if any(p.state in steps.LOADING_STATES and p.agent.is_routable for p in placements):
            return None  # another load of it is under way already
        try:
            return _start_load(model, placements, LoadTrigger.FAILURE)
        except NoCapacity:
            return None
