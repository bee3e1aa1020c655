"""Typed events for the live dashboard, sent to the channel layer's `fleet` group.

Writers call `announce` inside their transaction; the rows are read again and sent
once it commits, so a browser never sees state that was rolled back, and always the
state as committed (also after `.update()` calls that left objects stale). Every
event is `{"type": "<kind>", "items": [...]}`; the consumer has one handler per kind.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from agents.models import Agent, LoadEvent, Placement
from controlplane import traces

log = logging.getLogger(__name__)

GROUP = "fleet"
AGENTS, PLACEMENTS, LOADS, REQUESTS, BATCHES = (
    "agents.update",
    "placements.update",
    "loads.update",
    "requests.update",
    "batches.update",
)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()


def agent_payload(agent: Agent) -> dict[str, Any]:
    return {
        "agent_id": agent.agent_id, "state": agent.state, "gpu_name": agent.gpu_name,
        "gpu_count": agent.gpu_count, "gpu_memory_total": agent.gpu_memory_total,
        "gpu_memory_free": agent.gpu_memory_free, "gpu_utilization": agent.gpu_utilization,
        "engine_queue_length": agent.engine_queue_length,
        "last_heartbeat_at": _iso(agent.last_heartbeat_at),
        "contract_error": agent.contract_error[:300],
    }  # fmt: skip


def placement_payload(placement: Placement) -> dict[str, Any]:
    return {
        "id": placement.pk, "agent": placement.agent.agent_id, "model": placement.model.model_id,
        "state": placement.state, "cache_level": placement.cache_level,
        "bytes_done": placement.bytes_done, "bytes_total": placement.bytes_total,
        "phase": placement.phase, "requests_in_flight": placement.requests_in_flight,
        "requests_waiting": placement.requests_waiting, "error": placement.error[:300],
        "kv_cache_hit_rate": placement.kv_cache_hit_rate,
        "last_used_at": _iso(placement.last_used_at),
        # The LoRA adapters its engine holds, with the requests each has served.
        "adapters": {
            adapter_id: facts.get("requests_total", 0)
            for adapter_id, facts in sorted((placement.adapters or {}).items())
        },
    }  # fmt: skip


def load_payload(event: LoadEvent) -> dict[str, Any]:
    return {
        "id": event.pk, "agent": event.agent.agent_id, "model": event.model.model_id,
        "kind": event.kind, "trigger": event.trigger, "outcome": event.outcome,
        "from_level": event.from_level, "to_level": event.to_level,
        "queued_at": _iso(event.queued_at), "finished_at": _iso(event.finished_at),
        "queue_seconds": event.queue_seconds, "download_seconds": event.download_seconds,
        "engine_start_seconds": event.engine_start_seconds,
        "engine_start": event.engine_start, "engine_start_note": event.engine_start_note[:300],
        "compile_cache": event.compile_cache,
        "first_token_seconds": event.first_token_seconds, "total_seconds": event.total_seconds,
        "error": event.error[:300], "trace_url": traces.trace_url(event.trace_id),
    }  # fmt: skip


def request_minute_payload(row: Any) -> dict[str, Any]:
    return {
        "model": row.model.model_id, "minute": _iso(row.minute), "requests": row.requests,
        "errors": row.errors, "warm_ttft_seconds": row.warm_ttft_seconds,
        "warm_requests": row.warm_requests, "cold_ttft_seconds": row.cold_ttft_seconds,
        "cold_requests": row.cold_requests, "queued": row.queued, "shed": row.shed,
    }  # fmt: skip


def batch_payload(row: Any) -> dict[str, Any]:
    """A batch of /v1/batches (controlplane.gateway.models.Batch, its key joined) as the
    dashboard draws it: its progress, live."""
    return {
        "id": row.batch_id, "key": row.api_key.name, "status": row.status,
        "endpoint": row.endpoint, "total": row.total, "completed": row.completed,
        "failed": row.failed, "created_at": _iso(row.created_at),
        "expires_at": _iso(row.expires_at),
    }  # fmt: skip


def announce(
    *,
    agents: Iterable[int] = (),
    placements: Iterable[int] = (),
    loads: Iterable[int] = (),
) -> None:
    """Send the current state of these rows (primary keys) once the transaction commits."""
    agent_ids, placement_ids, load_ids = set(agents), set(placements), set(loads)
    if agent_ids or placement_ids or load_ids:
        transaction.on_commit(lambda: _send_rows(agent_ids, placement_ids, load_ids))


def _send_rows(agent_ids: set[int], placement_ids: set[int], load_ids: set[int]) -> None:
    messages = []
    if agent_ids:
        agents = Agent.objects.filter(pk__in=agent_ids)
        messages.append((AGENTS, [agent_payload(agent) for agent in agents]))
    if placement_ids:
        placements = Placement.objects.filter(pk__in=placement_ids).select_related("agent", "model")
        messages.append((PLACEMENTS, [placement_payload(p) for p in placements]))
    if load_ids:
        events = LoadEvent.objects.filter(pk__in=load_ids).select_related("agent", "model")
        messages.append((LOADS, [load_payload(event) for event in events]))
    for kind, items in messages:
        send(kind, items)


def send(kind: str, items: list[dict[str, Any]]) -> None:
    """Send now, from synchronous code."""
    async_to_sync(_group_send)(kind, items)


async def apublish(kind: str, item: dict[str, Any]) -> None:
    """Send now, from async code (the gateway's stats flush)."""
    await _group_send(kind, [item])


async def _group_send(kind: str, items: list[dict[str, Any]]) -> None:
    # A dashboard is never worth a failed write: a layer that is away is logged, not raised.
    layer = get_channel_layer()
    if layer is None:
        return
    try:
        await layer.group_send(GROUP, {"type": kind, "items": items})
    except Exception:
        log.exception("could not publish %s to the dashboard", kind)
