"""Agents joining and leaving: registration, drain orders and what the gateway saw of a
replica (`replica_failed`)."""

from __future__ import annotations

import logging
from dataclasses import asdict
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agents import events
from agents.choices import (
    AgentState,
    PlacementState,
)
from agents.models import Agent, Placement
from agents.scheduling import effective_agent_state, health_verdict, summarize_gpus
from nodeagent.protocol import (
    RegisterRequest,
)

log = logging.getLogger(__name__)


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
        agent.contract_version = request.contract
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
