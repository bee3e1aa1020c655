"""Loads: the load task's start and outcome, from the agent's answer to a LoadEvent that a
cold start (`coldstarts`) queued, and the first token that ends a cold start's timings."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from django.db import transaction
from django.utils import timezone

from agents import events, traces, transitions
from agents.actions import coldstarts, history, steps, unloads
from agents.choices import CacheLevel, LoadEventKind, LoadOutcome, LoadTrigger, PlacementState
from agents.models import Agent, LoadEvent, Placement
from agents.transitions import Event
from agents.validators import url_is_under
from nodeagent.protocol import EngineSpec, LoadModelRequest, LoadModelResponse, order_sources

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadJob:
    """What the load task needs to call the agent."""

    event_id: int
    agent_url: str
    credential: str
    request: LoadModelRequest


def begin_load(event_id: int) -> LoadJob | None:
    """Mark the load started (its queue time ends); None when it is not pending any more,
    e.g. a redelivered task whose load another worker already finished."""
    event = steps.claim_pending(event_id)
    if event is None:
        return None
    model = event.model
    # Nearest first for this agent; `source` is what an agent older than contract 1.4 reads.
    sources = tuple(order_sources(model.sources, event.agent.labels or {}))
    request = LoadModelRequest(
        model_id=model.model_id,
        source=sources[0].uri,
        revision=model.revision,
        engine=EngineSpec(
            args=model.engine_argv + model.lora_argv, trust_remote_code=model.trust_remote_code
        ),
        sources=sources,
        manifest=model.manifest,
    )
    return LoadJob(event.pk, event.agent.base_url, event.agent.credential, request)


def finish_load(event_id: int, response: LoadModelResponse) -> Placement | None:
    """The agent serves the model: the placement turns READY with its endpoint. An endpoint
    outside the agent's own base URL fails the load instead (the gateway would post prompts
    there)."""
    base = Agent.objects.filter(load_events__pk=event_id).values_list("base_url", flat=True)
    agent_url = base.first() or ""
    if not url_is_under(response.inference_endpoint_url, agent_url):
        fail_load(
            event_id,
            f"contract_violation: the agent's endpoint {response.inference_endpoint_url!r} is"
            f" outside its base URL {agent_url!r}",
        )
        return None
    now = timezone.now()
    placement_pk = LoadEvent.objects.filter(pk=event_id).values_list("placement", flat=True)
    with transaction.atomic():
        # Lock order: the placement, then its event (then the rollups, agents.actions.history).
        placement = (
            Placement.objects.select_for_update(no_key=True, of=("self",))
            .select_related("agent", "model")
            .filter(pk__in=placement_pk)
            .first()
        )
        event = (
            LoadEvent.objects.select_for_update(no_key=True, of=("self",))
            .select_related("model")
            .get(pk=event_id)
        )
        if event.outcome == LoadOutcome.FAILED:
            _refuse_late(event, placement)
            return None
        timings = response.timings
        # SUCCEEDED already: the sweep closed it from a heartbeat; the phases are new here.
        newly = event.outcome == LoadOutcome.PENDING
        event.outcome, event.finished_at = LoadOutcome.SUCCEEDED, event.finished_at or now
        event.download_seconds = timings.download_seconds
        event.engine_start_seconds = timings.engine_start_seconds or timings.wake_seconds
        event.engine_start = timings.engine_start
        event.engine_start_note = timings.engine_start_note
        event.compile_cache = timings.compile_cache
        event.source = timings.source
        event.compile_cache_seconds = timings.compile_cache_seconds
        event.failed_sources = "\n".join(timings.failed_sources)
        if timings.source:  # an agent of contract 1.4 counts what it fetched (0: all resumed)
            event.bytes_downloaded = timings.download_bytes
        else:
            event.bytes_downloaded = event.model.size_bytes if timings.download_seconds else 0
        event.save()
        history.observe_load(event)
        history.count_finished(event, newly=newly)
        if newly:
            traces.record_cold_start(event)
        if placement is None:
            return None
        if placement.state in steps.LOADING_STATES:
            transitions.move(placement, Event.ENGINE_READY)
            placement.ready_at = placement.last_used_at = now
        elif placement.state != PlacementState.READY:  # it moved on since (an unload)
            events.announce(loads=[event.pk])
            return None
        placement.cache_level = CacheLevel.GPU_RESIDENT
        placement.inference_endpoint_url = response.inference_endpoint_url
        placement.max_loras, placement.max_lora_rank = response.max_loras, response.max_lora_rank
        placement.max_num_seqs = response.max_num_seqs
        if timings.engine_start:  # a new engine: it holds no adapter yet
            placement.adapters = {}
        placement.bytes_done = placement.bytes_total
        placement.error, placement.phase = "", ""
        placement.save()
        events.announce(placements=[placement.pk], loads=[event.pk])
    return placement


def _refuse_late(event: LoadEvent, placement: Placement | None) -> None:
    """A load that finished after it was failed (expired, and maybe retried elsewhere): it
    does not turn READY, and the engine it started steps down, so the model never runs more
    replicas than it may. Under the placement's and the event's locks."""
    log.warning("load %s finished after it had failed; stepping its engine down", event.pk)
    if placement is None or placement.state in (PlacementState.UNLOADING, *steps.LOADING_STATES):
        return  # gone, or a later step of its own is under way
    if LoadEvent.objects.filter(placement=placement, queued_at__gt=event.queued_at).exists():
        return  # a later load of it decides
    unloads.begin_step_down(placement, CacheLevel.NVME_CACHED, LoadTrigger.FAILURE, queue=True)


def fail_load(event_id: int, error: str) -> Placement | None:
    """The load failed: record why, and try the next best agent while attempts remain.
    Returns the retry's placement, if one was started."""
    found = LoadEvent.objects.filter(pk=event_id).values("model", "placement").first()
    if found is None:
        return None
    with transaction.atomic():
        # Lock order: the placement, then the event (then its counter). The retry below is a
        # transaction of its own: its locks (model, then placements) never follow these.
        list(
            Placement.objects.select_for_update(no_key=True, of=("self",)).filter(
                pk=found["placement"]
            )
        )
        event = LoadEvent.objects.select_for_update(no_key=True, of=("self",)).get(pk=event_id)
        if event.outcome != LoadOutcome.PENDING:
            return None
        event.outcome, event.finished_at, event.error = LoadOutcome.FAILED, timezone.now(), error
        event.save()
        history.count_finished(event)
        # Only while the placement is this load's: a later load of it (after a heartbeat saw
        # it gone) is not undone by an old one failing.
        Placement.objects.filter(
            pk__in=steps.placement_of(event), state__in=steps.LOADING_STATES
        ).exclude(load_events__queued_at__gt=event.queued_at).update(
            state=transitions.target(Event.FAILED), error=error[:4000], phase="",
            updated_at=timezone.now(),
        )  # fmt: skip
        events.announce(placements=steps.placement_of(event), loads=[event.pk])
    traces.record_cold_start(event)
    log.warning("load of model %s on agent %s failed: %s", found["model"], event.agent_id, error)
    return coldstarts.retry_load(int(found["model"]))


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
        seconds = (now - event.finished_at).total_seconds()
        with transaction.atomic():
            recorded = LoadEvent.objects.filter(
                pk=event.pk, first_token_seconds__isnull=True
            ).update(first_token_seconds=seconds)
            if recorded:
                history.count_first_token(event, seconds)
        if recorded:
            traces.record_first_token(event, seconds)
        events.announce(loads=[event.pk])
