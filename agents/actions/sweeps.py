"""Beat's sweep: steps whose tasks died or never ran are closed, resent or failed, idle
models step down the ladder, and models are kept at their min_replicas."""

from __future__ import annotations

import logging
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Count, Exists, F, OuterRef, Q
from django.utils import timezone

from agents import events, scheduling, transitions
from agents import traces as cold_traces
from agents.actions import coldstarts, history, loads, steps, unloads
from agents.choices import (
    UNROUTABLE_AGENT_STATES,
    CacheLevel,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
    PlacementState,
)
from agents.models import LoadEvent, Model, Placement
from agents.transitions import Event
from controlplane import traces

log = logging.getLogger(__name__)


# A pending step whose task has not started this long after it was queued is sent again (the
# broker was away, or its message was lost with a worker); claiming makes a duplicate harmless.
_RESEND_AFTER = timedelta(seconds=60)


_resent_at: dict[int, float] = {}


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
                loads.fail_load(event.pk, "the load did not finish within the cold-start timeout")
            else:
                unloads.fail_unload(event.pk, "the unload did not finish within its timeout")
        elif event.started_at is None and now - event.queued_at > _RESEND_AFTER:
            _resend(event)
    return closed


def expire_stuck_placements() -> int:
    """Placements left mid-step with no step pending (its LoadEvent closed, or deleted, while
    the row stayed DOWNLOADING, LOADING_TO_GPU or UNLOADING) past the step's deadline: a load
    FAILED (visibly, so it can be tried again), an unload back where it was (a heartbeat
    then says where it really is). Returns how many."""
    now = timezone.now()
    deadlines = {
        state: now - _deadline(state) for state in (*transitions.LOADING, PlacementState.UNLOADING)
    }
    stale = Q()
    for state, before in deadlines.items():
        stale |= Q(state=state, updated_at__lt=before)
    pending = LoadEvent.objects.filter(placement=OuterRef("pk"), outcome=LoadOutcome.PENDING)
    stuck = Placement.objects.filter(stale).exclude(Exists(pending)).values_list("pk", flat=True)
    expired = 0
    for pk in list(stuck):
        with transaction.atomic():
            placement = (
                Placement.objects.select_for_update(no_key=True, of=("self",))
                .filter(pk=pk)
                .exclude(Exists(pending))
                .first()
            )
            # Read again under the lock: a step may have started or ended since.
            if placement is None or placement.state not in deadlines:
                continue
            if placement.updated_at >= deadlines[PlacementState(placement.state)]:
                continue
            if placement.state == PlacementState.UNLOADING:
                back = transitions.resting_state(placement.cache_level)
            else:
                back = PlacementState.FAILED
                placement.error = "its load was left unfinished past the cold-start timeout"
            transitions.move(placement, Event.EXPIRED, back)
            placement.save()
            events.announce(placements=[placement.pk])
            expired += 1
    if expired:
        log.warning("expired %d placement(s) left mid-step", expired)
    return expired


def _deadline(state: str) -> timedelta:
    """How long a placement may stay mid-step: as long as the step itself (_timeout)."""
    return _step_deadline(unload=state == PlacementState.UNLOADING)


def _done_anyway(event: LoadEvent, placement: Placement) -> bool:
    if event.kind == LoadEventKind.LOAD:
        return placement.state == PlacementState.READY
    return placement.state != PlacementState.UNLOADING


def _timeout(event: LoadEvent) -> timedelta:
    return _step_deadline(unload=event.kind == LoadEventKind.UNLOAD)


def _step_deadline(*, unload: bool) -> timedelta:
    """A load's or an unload's own timeout, and a minute for its task to say how it ended."""
    seconds = steps.UNLOAD_TIMEOUT_SECONDS if unload else settings.COLD_START_TIMEOUT_SECONDS
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
        history.count_finished(event, phases=False)
        events.announce(loads=[event.pk])
    if event.kind == LoadEventKind.LOAD:  # its trace, with the phases the sweep knows
        cold_traces.record_cold_start(event)
    log.info("%s %s finished on its agent; its task never said", event.kind.lower(), event_id)
    return 1


def _resend(event: LoadEvent) -> None:
    last = _resent_at.get(event.pk)
    if last is not None and time.monotonic() - last < _RESEND_AFTER.total_seconds():
        return
    _resent_at[event.pk] = time.monotonic()
    task = "agents.tasks.load" if event.kind == LoadEventKind.LOAD else "agents.tasks.unload"
    log.warning("%s %s was never started; queueing it again", event.kind.lower(), event.pk)
    steps.send(task, event.pk, headers=traces.load_task_headers(event.trace_id, event.span_id))


def keep_alive(placement: Placement) -> timedelta:
    """The idle time this replica keeps the GPU: what its last request asked (`keep_alive`,
    0 included), or else its model's."""
    if placement.keep_alive is not None:
        return placement.keep_alive
    return placement.model.keep_alive


def _facts(p: Placement, now: datetime) -> scheduling.PlacementFacts:
    return scheduling.PlacementFacts(
        placement_id=p.pk, model=p.model.model_id, agent_id=p.agent.agent_id,
        cache_level=p.cache_level, ready=p.state == PlacementState.READY,
        pinned=p.model.pinned, keep_alive_seconds=keep_alive(p).total_seconds(),
        min_replicas=p.model.min_replicas, idle_seconds=steps.idle_seconds(p, now),
        busy=bool(p.requests_in_flight or p.requests_waiting),
        max_replicas=p.model.max_replicas,
    )  # fmt: skip


def _step_down(plan: list[scheduling.Demotion], read: dict[int, Placement]) -> list[LoadEvent]:
    """Begin each planned step down whose placement is still as the plan read it (under its
    row lock); one that changed meanwhile is left for the next decision. A step down for
    being one too many also needs its model to be still over max_replicas, counted under the
    model's lock: the sweep and a heartbeat round may each have chosen another replica.
    Locks the model (for an EXCESS step), then the placement."""
    demoted = []
    for demotion in plan:
        with transaction.atomic():
            if demotion.trigger == LoadTrigger.EXCESS and not _still_over(
                read[demotion.placement_id].model_id
            ):
                continue
            placement = (
                Placement.objects.select_for_update(no_key=True, of=("self",))
                .select_related("agent", "model")
                .filter(pk=demotion.placement_id)
                .first()
            )
            if placement is None or placement.state != read[demotion.placement_id].state:
                continue
            demoted.append(
                unloads.begin_step_down(placement, demotion.to_level, demotion.trigger, queue=True)
            )
    return demoted


def _still_over(model_pk: int) -> bool:
    """Whether the model has more routable GPU replicas than max_replicas (locks the model)."""
    model = Model.objects.select_for_update(no_key=True, of=("self",)).filter(pk=model_pk).first()
    if model is None:
        return False
    serving = Placement.objects.ready_for(model).filter(cache_level=CacheLevel.GPU_RESIDENT)
    return serving.count() > model.max_replicas


def sweep() -> list[LoadEvent]:
    """Beat's eviction sweep: step idle models down the ladder (scheduling.plan_sweep), top
    models up to their min_replicas, and fail loads a dead worker left pending."""
    settle_orphaned_steps()
    expire_stuck_placements()
    now = timezone.now()
    placements = list(
        Placement.objects.exclude(agent__state__in=UNROUTABLE_AGENT_STATES)
        .filter(
            Q(state=PlacementState.READY, cache_level=CacheLevel.GPU_RESIDENT)
            | Q(cache_level=CacheLevel.DRAM_CACHED, state=PlacementState.UNLOADED)
        )
        .select_related("model", "agent")
    )
    facts = [_facts(p, now) for p in placements]
    memory = {
        p.agent.agent_id: scheduling.AgentMemory(
            p.agent.agent_id, p.agent.gpu_memory_total, p.agent.gpu_memory_free
        )
        for p in placements
    }
    plan = scheduling.plan_sweep(
        facts, list(memory.values()), pressure_percent=settings.GPU_MEMORY_PRESSURE_PERCENT
    )
    demoted = _step_down(plan, {p.pk: p for p in placements})
    for model in Model.objects.filter(enabled=True, min_replicas__gt=0):
        coldstarts.scale_out(model, LoadTrigger.SCALE_OUT)
    for placement_pk, adapter_id in idle_adapters(placements):
        steps.send("agents.tasks.unload_adapter", placement_pk, adapter_id)
    return demoted


def step_down_excess() -> list[LoadEvent]:
    """Step down the GPU replicas beyond their model's max_replicas now (the sweep would, at
    its next run): run after each heartbeat round, which is what brings most of them back (a
    load that finished late, an agent back from a partition). One grouped query when there is
    none. Locks each chosen placement."""
    ready = Placement.objects.ready_for_any().filter(cache_level=CacheLevel.GPU_RESIDENT)
    crowded = (
        ready.values("model_id")
        .annotate(n=Count("pk"))
        .filter(n__gt=F("model__max_replicas"))
        .values_list("model_id", flat=True)
    )
    placements = list(ready.filter(model_id__in=list(crowded)).select_related("model", "agent"))
    if not placements:
        return []
    now = timezone.now()
    plan = []
    for model_pk in {p.model_id for p in placements}:
        replicas = [_facts(p, now) for p in placements if p.model_id == model_pk]
        plan += [
            scheduling.Demotion(facts.placement_id, CacheLevel.DRAM_CACHED, LoadTrigger.EXCESS)
            for facts in scheduling.excess_replicas(replicas, len(replicas))
        ]
    return _step_down(plan, {p.pk: p for p in placements})


def idle_adapters(placements: list[Placement]) -> list[tuple[int, str]]:
    """(placement, adapter) pairs whose adapter is idle past its own keep_alive in a READY
    engine (its agent's last word, Placement.adapters): the adapter unloads, the engine stays."""
    held = {
        adapter_id
        for p in placements
        if p.state == PlacementState.READY
        for adapter_id in (p.adapters or {})
    }
    if not held:
        return []
    keep = {
        model_id: alive.total_seconds()
        for model_id, alive in Model.objects.filter(model_id__in=held).values_list(
            "model_id", "keep_alive"
        )
    }
    now = time.time()
    return [
        (p.pk, adapter_id)
        for p in placements
        if p.state == PlacementState.READY
        for adapter_id in scheduling.idle_adapters(p.adapters or {}, keep, now)
    ]
