"""LoRA adapters in their bases' engines: what the control plane keeps of them, and the
sweep's unloads of idle ones. Which engine holds which adapter is the agents' to say
(heartbeats, `heartbeats.adapter_facts`); this only removes what the control plane unloaded."""

from __future__ import annotations

from dataclasses import dataclass

from django.db import transaction

from agents import events
from agents.choices import PlacementState
from agents.models import Placement


@dataclass(frozen=True)
class AdapterUnloadJob:
    """What the unload_adapter task needs to call the agent."""

    agent_id: str
    agent_url: str
    credential: str
    model_id: str  # the base, whose engine holds the adapter


def adapter_unload_job(placement_pk: int, adapter_id: str) -> AdapterUnloadJob | None:
    """The call to make, or None when the engine no longer holds the adapter (as last heard)
    or is not READY any more (its adapters went with its engine)."""
    placement = (
        Placement.objects.select_related("agent", "model")
        .filter(pk=placement_pk, state=PlacementState.READY)
        .first()
    )
    if placement is None or adapter_id not in (placement.adapters or {}):
        return None
    agent = placement.agent
    return AdapterUnloadJob(
        agent.agent_id, agent.base_url, agent.credential, placement.model.model_id
    )


def forget_adapter(placement_pk: int, adapter_id: str) -> None:
    """The engine no longer holds the adapter: drop it from the placement. Locks the placement."""
    with transaction.atomic():
        placement = (
            Placement.objects.select_for_update(no_key=True, of=("self",))
            .filter(pk=placement_pk)
            .first()
        )
        if placement is None or adapter_id not in (placement.adapters or {}):
            return
        placement.adapters = {k: v for k, v in placement.adapters.items() if k != adapter_id}
        placement.save(update_fields=["adapters", "updated_at"])
    events.announce(placements=[placement_pk])
