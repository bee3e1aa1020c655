"""Load progress the agents push as it happens (`POST /api/agents/<id>/progress`).

Between heartbeats, the one thing worth writing at once is where a pending load is: its
phase, its bytes, and DOWNLOADING turning into LOADING_TO_GPU. Nothing else of a report is
taken: a load ends READY or FAILED by its task's answer (or the heartbeat that reports its
outcome), never by a progress report, which may arrive after that answer.
"""

from __future__ import annotations

from collections.abc import Sequence

from django.db import transaction
from django.utils import timezone

from agents import events, transitions
from agents.actions import steps
from agents.choices import PlacementState
from agents.models import Agent, Placement
from agents.transitions import Event
from nodeagent.protocol import ModelStatus

_FIELDS = ["state", "bytes_done", "bytes_total", "phase", "updated_at"]


def record_progress(agent: Agent, statuses: Sequence[ModelStatus]) -> int:
    """Write the reported progress of `agent`'s pending loads; how many placements moved.
    Locks those placements (by primary key)."""
    reported = {status.model_id: status for status in statuses}
    if not reported:
        return 0
    with transaction.atomic():
        placements = list(
            Placement.objects.select_for_update(no_key=True, of=("self",))
            .select_related("model")
            .filter(agent=agent, model__model_id__in=reported, state__in=steps.LOADING_STATES)
            .order_by("pk")
        )
        now = timezone.now()
        changed = []
        for placement in placements:
            status = reported[placement.model.model_id]
            state = PlacementState(status.cache_state)
            if state in transitions.LOADING and state != placement.state:
                if not transitions.allowed(PlacementState(placement.state), Event.REPORTED, state):
                    continue  # older than what is written (LOADING_TO_GPU back to DOWNLOADING)
                transitions.move(placement, Event.REPORTED, state)
            elif state not in transitions.LOADING:
                continue  # READY or FAILED: the load's own answer says so
            placement.bytes_done, placement.bytes_total = status.bytes_done, status.bytes_total
            placement.phase, placement.updated_at = status.phase, now
            changed.append(placement)
        Placement.objects.bulk_update(changed, _FIELDS)
        events.announce(placements=[placement.pk for placement in changed])
    return len(changed)
