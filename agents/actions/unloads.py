"""Stepping placements down the eviction ladder (GPU -> host RAM -> disk -> gone): an
operator's order, the sweep's, or a load making room; and what the agent answered."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from agents import events, transitions
from agents.actions import history, steps
from agents.choices import (
    CacheLevel,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
    PlacementState,
)
from agents.models import LoadEvent, Placement
from agents.transitions import Event
from nodeagent.protocol import (
    ModelState,
    UnloadModelResponse,
)

log = logging.getLogger(__name__)


def begin_step_down(placement: Placement, to_level: str, trigger: str, *, queue: bool) -> LoadEvent:
    """Take the placement out of routing at once and record the step down; the agent is called
    by the unload task (queued here, or run first by the load it makes room for). Raises
    IllegalTransition (writing nothing) when the placement cannot step down now; the caller
    holds its row lock."""
    transitions.move(placement, Event.UNLOAD_REQUESTED)
    event = LoadEvent.objects.create(
        agent=placement.agent, model=placement.model, placement=placement,
        kind=LoadEventKind.UNLOAD, trigger=trigger, from_level=placement.cache_level,
        to_level=to_level,
    )  # fmt: skip
    placement.save(update_fields=["state", "updated_at"])
    events.announce(placements=[placement.pk], loads=[event.pk])
    if queue:
        steps.queue("agents.tasks.unload", event.pk)
    return event


class CannotStepDown(Exception):
    """The placement is not where it can step down to the level asked for (yet)."""


# The ladder, top first: a step goes to a level further down.
LADDER = [CacheLevel.GPU_RESIDENT, CacheLevel.DRAM_CACHED, CacheLevel.NVME_CACHED, CacheLevel.NONE]


def below(level: str, than: str) -> bool:
    """Whether `level` is further down the eviction ladder than `than`."""
    if level not in CacheLevel.values or than not in CacheLevel.values:
        return False
    return LADDER.index(CacheLevel(level)) > LADDER.index(CacheLevel(than))


def unload(placement: Placement, to_level: str, trigger: str = LoadTrigger.OPERATOR) -> LoadEvent:
    """Step a placement down to `to_level` (DRAM_CACHED, NVME_CACHED or NONE). Raises
    CannotStepDown while it loads or unloads, or when it is not above that level."""
    with transaction.atomic():
        locked = (
            Placement.objects.select_for_update(no_key=True, of=("self",))
            .select_related("agent", "model")
            .get(pk=placement.pk)
        )
        if to_level not in LADDER[1:]:
            raise CannotStepDown(f"{to_level} is not a level to step down to")
        if locked.state in (*steps.LOADING_STATES, PlacementState.UNLOADING):
            raise CannotStepDown(f"{locked} is {locked.get_state_display().lower()}; wait for it")
        if LADDER.index(CacheLevel(locked.cache_level)) >= LADDER.index(CacheLevel(to_level)):
            raise CannotStepDown(f"{locked} is at {locked.cache_level}, not above {to_level}")
        return begin_step_down(locked, to_level, trigger, queue=True)


# A replica stepped down for being one too many (EXCESS) may serve requests right now: the
# agent lets them finish first, this long at most (new ones go to the other replicas).
EXCESS_DRAIN_SECONDS = 60.0


@dataclass(frozen=True)
class UnloadJob:
    event_id: int
    agent_url: str
    credential: str
    model_id: str
    to_level: str
    drain_seconds: float = 0.0


def begin_unload(event_id: int) -> UnloadJob | None:
    event = steps.claim_pending(event_id)
    if event is None:
        return None
    agent = event.agent
    drain = EXCESS_DRAIN_SECONDS if event.trigger == LoadTrigger.EXCESS else 0.0
    return UnloadJob(
        event.pk, agent.base_url, agent.credential, event.model.model_id, event.to_level, drain
    )


def finish_unload(event_id: int, response: UnloadModelResponse) -> None:
    """The agent stepped the model down, maybe further than asked (an engine that cannot sleep).
    An answer that comes after the step was failed (it expired, and the placement went back to
    serving) still says where the model is: the placement follows it, the event stays failed."""
    with transaction.atomic():
        event = _lock_step(event_id)
        newly = event.outcome == LoadOutcome.PENDING
        if newly:
            event.outcome, event.finished_at = LoadOutcome.SUCCEEDED, timezone.now()
            event.to_level = response.cache_level
            event.error = response.note
            event.save()
            history.count_finished(event)
        placement = Placement.objects.filter(pk__in=steps.placement_of(event)).first()
        ended = (
            PlacementState.FAILED
            if response.cache_state == ModelState.FAILED
            else PlacementState.UNLOADED
        )
        if placement is not None and placement.state == PlacementState.UNLOADING:
            transitions.move(placement, Event.UNLOAD_DONE, ended)
        elif placement is not None and not newly and placement.state == PlacementState.READY:
            later = LoadEvent.objects.filter(placement=placement, queued_at__gt=event.queued_at)
            if later.exists():
                placement = None  # a later step of it decides
            else:
                transitions.move(placement, Event.REPORTED, ended)
        else:
            placement = None
        if placement is not None:
            placement.cache_level = response.cache_level
            placement.inference_endpoint_url = ""
            placement.save()
        events.announce(placements=steps.placement_of(event), loads=[event.pk])


def _lock_step(event_id: int) -> LoadEvent:
    """The unload's event, locked after its placement (the lock order)."""
    placement = LoadEvent.objects.filter(pk=event_id).values_list("placement", flat=True)
    list(Placement.objects.select_for_update(no_key=True, of=("self",)).filter(pk__in=placement))
    return LoadEvent.objects.select_for_update(no_key=True, of=("self",)).get(pk=event_id)


def fail_unload(event_id: int, error: str) -> None:
    """The agent refused, could not be reached, or the step expired: the placement is back where
    it was (serving, or asleep in host RAM); a heartbeat corrects it if the agent is gone."""
    with transaction.atomic():
        event = _lock_step(event_id)
        if event.outcome != LoadOutcome.PENDING:  # closed already (settle_orphaned_steps)
            return
        event.outcome, event.finished_at, event.error = (
            LoadOutcome.FAILED,
            timezone.now(),
            error,
        )
        event.save()
        history.count_finished(event)
        placement = Placement.objects.filter(pk__in=steps.placement_of(event)).first()
        if placement is not None and placement.state == PlacementState.UNLOADING:
            back = transitions.resting_state(placement.cache_level)
            transitions.move(placement, Event.UNLOAD_REFUSED, back)
            placement.save(update_fields=["state", "updated_at"])
        events.announce(placements=steps.placement_of(event), loads=[event.pk])
