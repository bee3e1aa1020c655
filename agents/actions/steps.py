"""The task protocol shared by loads and unloads: queueing a step's task once its rows
commit, claiming a step when its task starts, and the facts both read."""

from __future__ import annotations

import logging
from datetime import datetime

from django.db import transaction
from django.utils import timezone

from agents import transitions
from agents.choices import (
    LoadOutcome,
)
from agents.models import LoadEvent, Placement

log = logging.getLogger(__name__)


# A placement in one of these states has a load under way.
LOADING_STATES = tuple(sorted(transitions.LOADING))


# What one unload may take: stopping an engine waits out its grace period.
UNLOAD_TIMEOUT_SECONDS = 120.0


def queue(task_name: str, *args: object, headers: dict[str, str] | None = None) -> None:
    """Send a task once the transaction that wrote its rows commits (never before). A broker
    that is away does not fail the caller: the sweep sends it again (settle_orphaned_steps).
    `headers` go with the message (a trace's context: controlplane.traces)."""
    transaction.on_commit(lambda: send(task_name, *args, headers=headers))


def send(task_name: str, *args: object, headers: dict[str, str] | None = None) -> None:
    from controlplane.celery import app

    try:
        app.send_task(task_name, args=args, headers=headers)
    except Exception as exc:  # kombu's OperationalError, a socket error: the broker is away
        log.warning("could not queue %s%s (the sweep will): %s", task_name, args, exc)


def claim_pending(event_id: int) -> LoadEvent | None:
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


def placement_of(event: LoadEvent) -> list[int]:
    """The event's placement as a filter; empty when an operator deleted it meanwhile."""
    return [] if event.placement_id is None else [event.placement_id]


def idle_seconds(placement: Placement, now: datetime) -> float:
    since = placement.last_used_at or placement.ready_at or placement.updated_at
    return (now - since).total_seconds()
