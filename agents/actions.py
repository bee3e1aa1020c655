"""Every write to fleet state. Views, tasks and admin actions call these and write nothing else."""

from __future__ import annotations

from dataclasses import asdict
from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from agents.choices import AgentState
from agents.models import Agent, Model
from agents.scheduling import effective_agent_state, health_verdict, summarize_gpus
from nodeagent.protocol import RegisterRequest


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
        agent, created = Agent.objects.select_for_update().get_or_create(
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
    return agent, created


def drain_agent(agent_id: str) -> Agent:
    """Stop sending new work to the agent; what it serves now finishes. Takes a row lock."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update().get(agent_id=agent_id)
        if agent.drained_at is None:
            agent.drained_at = timezone.now()
        agent.state = effective_agent_state(
            AgentState(agent.reported_state),
            draining=True,
            health=health_verdict(AgentState(agent.state)),
        )
        agent.save(update_fields=["drained_at", "state", "updated_at"])
    return agent


def undrain_agent(agent_id: str) -> Agent:
    """Let the agent take new work again. Takes a row lock."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update().get(agent_id=agent_id)
        agent.drained_at = None
        agent.state = effective_agent_state(
            AgentState(agent.reported_state),
            draining=False,
            health=health_verdict(AgentState(agent.state)),
        )
        agent.save(update_fields=["drained_at", "state", "updated_at"])
    return agent


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
        model = Model.objects.select_for_update().filter(model_id=model_id).first()
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
