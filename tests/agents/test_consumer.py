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
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)


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


async def test_a_batch_is_in_the_snapshot_and_its_progress_is_published():
    from datetime import timedelta

    from django.utils import timezone

    from controlplane.gateway import batchactions
    from controlplane.gateway.models import Batch, StoredFile
    from tests.factories import make_api_key

    def a_batch() -> Batch:
        key, _ = make_api_key("nightly")
        stored = StoredFile.objects.create(api_key=key, filename="in.jsonl", purpose="batch",
                                           bytes=10, lines=2, location="file:///f")  # fmt: skip
        return Batch.objects.create(
            api_key=key, input_file=stored, input_name=stored.file_id, total=2,
            endpoint="/v1/chat/completions", expires_at=timezone.now() + timedelta(hours=1),
        )  # fmt: skip

    batch = await sync_to_async(a_batch)()
    communicator = socket(await sync_to_async(staff_cookie)())
    connected, _ = await communicator.connect()
    assert connected
    snapshot = await communicator.receive_json_from()
    (shown,) = snapshot["batches"]
    assert (shown["id"], shown["key"], shown["status"], shown["total"]) == (
        batch.batch_id,
        "nightly",
        "validating",
        2,
    )

    def progress() -> None:
        assert batchactions.claim(batch.pk, "runner")
        batchactions.start(batch.pk, "runner")
        batchactions.journal(batch.pk, "runner", "a", 1, 200, {}, "")
        batchactions.renew(batch.pk, "runner")

    await sync_to_async(progress)()
    first = await communicator.receive_json_from()
    assert first["type"] == "batches"
    assert first["items"][0]["status"] == "in_progress"
    renewed = await communicator.receive_json_from()
    assert (renewed["items"][0]["completed"], renewed["items"][0]["failed"]) == (1, 0)
    await communicator.disconnect()
