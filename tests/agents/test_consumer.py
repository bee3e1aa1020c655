"""The dashboard's WebSocket consumer, through the real ASGI application."""

from __future__ import annotations

import time

import pytest
from asgiref.sync import sync_to_async
from channels.layers import channel_layers
from channels.testing import WebsocketCommunicator
from django.test import Client

from agents import actions
from agents.actions import steps
from agents.agent_client import HeartbeatResult
from agents.choices import PlacementState
from controlplane.asgi import application
from nodeagent.protocol import DiskInfo, HeartbeatResponse, ModelStatus
from tests.factories import AgentFactory, ModelFactory, make_role_user, make_staff_user

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(autouse=True)
def in_memory_layer(settings):
    """Consumer and writers share this process here: no Redis needed, nothing left over."""
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    channel_layers.backends.clear()
    yield
    channel_layers.backends.clear()


@pytest.fixture(autouse=True)
def no_broker(monkeypatch):
    monkeypatch.setattr(steps, "queue", lambda name, *args: None)


def socket(cookie: str | None = None) -> WebsocketCommunicator:
    headers = [(b"origin", b"http://localhost"), (b"host", b"localhost")]
    if cookie:
        headers.append((b"cookie", cookie.encode()))
    return WebsocketCommunicator(application, "/ws/fleet/", headers=headers)


def staff_cookie() -> str:
    client = Client()
    client.force_login(make_staff_user())
    return f"sessionid={client.cookies['sessionid'].value}"


async def test_anonymous_and_non_staff_users_are_refused():
    connected, _ = await socket().connect()
    assert not connected

    def someone() -> str:
        from django.contrib.auth import get_user_model

        client = Client()
        client.force_login(get_user_model().objects.create_user("someone", password="x" * 12))
        return f"sessionid={client.cookies['sessionid'].value}"

    connected, _ = await socket(await sync_to_async(someone)()).connect()
    assert not connected


async def test_staff_without_the_permission_to_view_agents_are_refused():
    def nobody() -> str:
        client = Client()
        client.force_login(make_role_user("nobody"))
        return f"sessionid={client.cookies['sessionid'].value}"

    connected, _ = await socket(await sync_to_async(nobody)()).connect()
    assert not connected


async def test_staff_get_a_snapshot_then_the_events_a_load_and_a_heartbeat_publish():
    agent = await sync_to_async(AgentFactory)(agent_id="gpu-1")
    model = await sync_to_async(ModelFactory)(model_id="org/m")
    communicator = socket(await sync_to_async(staff_cookie)())
    connected, _ = await communicator.connect()
    assert connected
    snapshot = await communicator.receive_json_from()
    assert snapshot["type"] == "snapshot"
    assert [a["agent_id"] for a in snapshot["agents"]] == ["gpu-1"]
    assert snapshot["placements"] == []

    placement = await sync_to_async(actions.ensure_placement)(model)
    received = {}
    for _ in range(2):
        message = await communicator.receive_json_from()
        received[message["type"]] = message["items"]
    assert received["placements"][0]["state"] == PlacementState.DOWNLOADING
    assert received["placements"][0]["model"] == "org/m"
    assert received["loads"][0]["outcome"] == "PENDING"

    beat = HeartbeatResponse(
        agent_id="gpu-1", state="LOADING_MODEL", version="1", gpus=(), gpu_utilization=None,
        gpu_memory_total=0, gpu_memory_free=0, vllm_queue_length=0,
        disk=DiskInfo("/", 1, 1, 0),
        models=(ModelStatus("org/m", "DOWNLOADING", "NONE", bytes_done=5, bytes_total=10),),
    )  # fmt: skip
    polled = HeartbeatResult(agent.pk, time.time() + 1, beat)
    await sync_to_async(actions.apply_heartbeats)([polled])
    received = {}
    for _ in range(2):
        message = await communicator.receive_json_from()
        received[message["type"]] = message["items"]
    assert received["agents"][0]["state"] == "LOADING_MODEL"
    [moving] = received["placements"]
    assert (moving["id"], moving["bytes_done"], moving["bytes_total"]) == (placement.pk, 5, 10)
    await communicator.disconnect()
