"""The fleet's history kept bounded: step counters rolled up as steps finish, each agent's
running estimates of its load phases, and the pruning of old load events (beat's
`agents.tasks.prune_history`; the gateway's `gateway.tasks.prune_history` prunes its own)."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db.models import F, QuerySet
from django.utils import timezone

from agents import scheduling
from agents.choices import CacheLevel, LoadOutcome
from agents.models import LoadEstimate, LoadEvent, StepCounter
from nodeagent.protocol import source_store

log = logging.getLogger(__name__)

# Rows one DELETE removes: short statements, so pruning never holds locks for long.
PRUNE_BATCH = 5000


def _counter(event: LoadEvent) -> StepCounter:
    counter, _ = StepCounter.objects.get_or_create(
        kind=event.kind, outcome=event.outcome, trigger=event.trigger,
        from_level=event.from_level, to_level=event.to_level,
    )  # fmt: skip
    return counter


def count_finished(event: LoadEvent, *, newly: bool = True, phases: bool = True) -> None:
    """Add a finished step to its counter (`newly`: it was pending until now) and its phases'
    seconds (`phases`: they are known now). Locks the counter row last (the lock order)."""
    increments: dict[str, F | object] = {}
    if newly:
        increments["count"] = F("count") + 1
    if phases:
        for phase in ("queue", "download", "engine_start"):
            value = getattr(event, f"{phase}_seconds")
            if value is not None:
                increments[f"{phase}_seconds"] = F(f"{phase}_seconds") + value
                increments[f"{phase}_n"] = F(f"{phase}_n") + 1
    if increments:
        StepCounter.objects.filter(pk=_counter(event).pk).update(**increments)


def count_first_token(event: LoadEvent, seconds: float) -> None:
    StepCounter.objects.filter(pk=_counter(event).pk).update(
        first_token_seconds=F("first_token_seconds") + seconds,
        first_token_n=F("first_token_n") + 1,
    )


def observe_load(event: LoadEvent) -> None:
    """Fold a finished load's phases into its agent's running estimates. Locks the agent's
    LoadEstimate row (after the event: the lock order ends with these rollups)."""
    LoadEstimate.objects.get_or_create(agent_id=event.agent_id)
    estimate = LoadEstimate.objects.select_for_update(no_key=True, of=("self",)).get(
        agent_id=event.agent_id
    )
    if event.download_seconds and event.bytes_downloaded:
        rate = event.bytes_downloaded / event.download_seconds
        estimate.bytes_per_second = scheduling.observe(estimate.bytes_per_second, rate)
        if event.source:
            by_store = dict(estimate.source_bytes_per_second or {})
            store = source_store(event.source)
            by_store[store] = scheduling.observe(by_store.get(store), rate)
            estimate.source_bytes_per_second = by_store
    if event.from_level == CacheLevel.DRAM_CACHED:
        estimate.wake_seconds = scheduling.observe(
            estimate.wake_seconds, event.engine_start_seconds
        )
    elif event.from_level in (CacheLevel.NVME_CACHED, CacheLevel.NONE):
        estimate.engine_start_seconds = scheduling.observe(
            estimate.engine_start_seconds, event.engine_start_seconds
        )
    estimate.save()


def prune_load_events(now: datetime | None = None) -> int:
    """Delete finished load events older than RETENTION_LOAD_EVENTS_DAYS (steps under way are
    never deleted; their counters and the agents' estimates keep what they showed)."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.RETENTION_LOAD_EVENTS_DAYS)
    old = LoadEvent.objects.filter(queued_at__lt=cutoff).exclude(outcome=LoadOutcome.PENDING)
    return delete_in_batches(old)


def delete_in_batches(queryset: QuerySet[Any]) -> int:
    """Delete the rows of `queryset` PRUNE_BATCH at a time (nothing refers to these rows, so
    each batch is one DELETE); returns how many."""
    deleted = 0
    while True:
        batch = list(queryset.values_list("pk", flat=True)[:PRUNE_BATCH])
        if not batch:
            return deleted
        deleted += queryset.model.objects.filter(pk__in=batch).delete()[0]
