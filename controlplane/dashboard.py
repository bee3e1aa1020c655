"""The dashboard's WebSocket: the fleet's state once, then every change as it commits.

It lives in the project package, above both apps, because it draws both: the agents' fleet and
the gateway's request figures and batches (`agents` never imports the gateway)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncJsonWebsocketConsumer
from django.db.models import Q
from django.utils import timezone

from agents import events
from agents.choices import CacheLevel, LoadEventKind, LoadOutcome, PlacementState
from agents.models import Agent, LoadEvent, Placement
from agents.views import DASHBOARD_PERMISSION
from controlplane.gateway.models import BATCH_RUNNING_STATES, Batch, RequestMinute

# How far back the per-model request panel and the cold-start timeline reach.
RECENT_MINUTES = 15
RECENT_LOADS = 30
RECENT_BATCHES = 50


class FleetConsumer(AsyncJsonWebsocketConsumer):
    """Staff who may view agents only: the handshake of anyone else is refused (HTTP 403)."""

    async def connect(self) -> None:
        user = self.scope.get("user")
        if user is None or not user.is_authenticated or not user.is_staff:
            await self.close()
            return
        if not await database_sync_to_async(user.has_perm)(DASHBOARD_PERMISSION):
            await self.close()
            return
        await self.channel_layer.group_add(events.GROUP, self.channel_name)
        await self.accept()
        await self.send_json({"type": "snapshot", **(await database_sync_to_async(snapshot)())})

    async def disconnect(self, code: int) -> None:
        await self.channel_layer.group_discard(events.GROUP, self.channel_name)

    # One handler per event type (agents.events), each passing its items on.
    async def agents_update(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "agents", "items": event["items"]})

    async def placements_update(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "placements", "items": event["items"]})

    async def loads_update(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "loads", "items": event["items"]})

    async def requests_update(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "requests", "items": event["items"]})

    async def batches_update(self, event: dict[str, Any]) -> None:
        await self.send_json({"type": "batches", "items": event["items"]})


def snapshot() -> dict[str, Any]:
    """Everything the dashboard draws, as of now."""
    since = timezone.now() - timedelta(minutes=RECENT_MINUTES)
    placements = Placement.objects.exclude(
        state=PlacementState.UNLOADED, cache_level=CacheLevel.NONE
    ).select_related("agent", "model")
    loads = list(
        LoadEvent.objects.filter(outcome=LoadOutcome.PENDING).select_related("agent", "model")
    ) + list(
        LoadEvent.objects.filter(kind=LoadEventKind.LOAD)
        .exclude(outcome=LoadOutcome.PENDING)
        .select_related("agent", "model")[:RECENT_LOADS]
    )
    minutes = RequestMinute.objects.filter(minute__gte=since).select_related("model")
    # Batches with work left, and those that ended in the panel's window.
    batches = Batch.objects.filter(
        Q(status__in=BATCH_RUNNING_STATES) | Q(created_at__gte=since)
    ).select_related("api_key")[:RECENT_BATCHES]
    return {
        "agents": [events.agent_payload(agent) for agent in Agent.objects.all()],
        "placements": [events.placement_payload(p) for p in placements],
        "loads": [events.load_payload(event) for event in loads],
        "requests": [events.request_minute_payload(row) for row in minutes],
        "batches": [events.batch_payload(row) for row in batches],
        "recent_minutes": RECENT_MINUTES,
    }
