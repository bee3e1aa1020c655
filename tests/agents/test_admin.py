from __future__ import annotations

import pytest
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone

from agents.choices import AgentState
from agents.models import Agent
from controlplane.gateway.models import ApiKey, Batch, StoredFile, Usage, hash_key
from tests.factories import (
    AgentFactory,
    LoadEventFactory,
    ModelFactory,
    PlacementFactory,
    make_api_key,
)

pytestmark = pytest.mark.django_db


@pytest.fixture
def fleet():
    placement = PlacementFactory(bytes_done=5, bytes_total=10)
    LoadEventFactory(agent=placement.agent, model=placement.model, placement=placement)
    key, _ = make_api_key("app", (placement.model.model_id,))
    Usage.objects.create(
        api_key=key,
        model_id=placement.model.model_id,
        day="2026-11-27",
        requests=3,
        prompt_tokens=30,
    )
    AgentFactory(state=AgentState.OFFLINE, gpu_count=0, gpu_name="", gpu_memory_total=0)
    stored = StoredFile.objects.create(api_key=key, filename="in.jsonl", purpose="batch",
                                       bytes=10, lines=1, location="file:///files")  # fmt: skip
    Batch.objects.create(api_key=key, input_file=stored, input_name=stored.file_id,
                         endpoint="/v1/chat/completions", total=1,
                         expires_at=timezone.now())  # fmt: skip
    return placement


def registered_models():
    return [
        model for model in admin.site._registry if model._meta.app_label in {"agents", "gateway"}
    ]


def test_every_fleet_model_is_in_the_admin():
    names = {model.__name__ for model in registered_models()}
    assert names == {"Agent", "Model", "Placement", "LoadEvent", "ApiKey", "Usage", "Batch",
                     "StoredFile"}  # fmt: skip


@pytest.mark.parametrize("model", registered_models(), ids=lambda model: model.__name__)
def test_changelist_and_change_pages_render(staff_client, fleet, model):
    opts = model._meta
    changelist = staff_client.get(reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist"))
    assert changelist.status_code == 200

    obj = model._default_manager.first()
    change = staff_client.get(
        reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[obj.pk])
    )
    assert change.status_code == 200


@pytest.mark.parametrize("query", ["?state__exact=READY", "?cache_level__exact=GPU_RESIDENT&o=3"])
def test_placements_filter_by_state_and_cache_level(staff_client, fleet, query):
    response = staff_client.get(reverse("admin:agents_placement_changelist") + query)
    assert response.status_code == 200
    assert fleet.model.model_id in response.content.decode()


def test_load_events_are_listed_newest_first(staff_client):
    old = LoadEventFactory()
    new = LoadEventFactory()
    response = staff_client.get(reverse("admin:agents_loadevent_changelist"))
    assert list(response.context["cl"].result_list) == [new, old]


def test_agent_page_shows_state_gpu_memory_and_placements_inline(staff_client, fleet):
    agent = fleet.agent
    page = staff_client.get(reverse("admin:agents_agent_change", args=[agent.pk])).content.decode()
    assert fleet.model.model_id in page
    listing = staff_client.get(reverse("admin:agents_agent_changelist")).content.decode()
    assert "60.0 GiB of 80.0 GiB" in listing
    assert "Idle" in listing


def test_drain_and_undrain_admin_actions(staff_client):
    agents = AgentFactory.create_batch(2)
    url = reverse("admin:agents_agent_changelist")
    ids = [agent.pk for agent in agents]

    response = staff_client.post(url, {"action": "drain", "_selected_action": ids}, follow=True)
    assert response.status_code == 200
    assert set(Agent.objects.values_list("state", flat=True)) == {AgentState.DRAINING}

    staff_client.post(url, {"action": "undrain", "_selected_action": ids})
    assert set(Agent.objects.values_list("state", flat=True)) == {AgentState.IDLE}


def test_agents_cannot_be_added_by_hand(staff_client):
    assert staff_client.get(reverse("admin:agents_agent_add")).status_code == 403


def test_catalog_models_can_be_added_in_the_admin(staff_client):
    response = staff_client.post(
        reverse("admin:agents_model_add"),
        {
            "model_id": "org/tiny",
            "source": "file:///srv/models/tiny",
            "kind": "embedding",
            "size_bytes": 2_000_000,
            "gpu_memory_bytes": 0,
            "engine_args": '["--dtype", "float32"]',
            "keep_alive": "00:10:00",
            "max_keep_alive": "01:00:00",
            "min_replicas": 0,
            "max_replicas": 1,
            "max_loras": 4,
            "enabled": "on",
            "owned_by": "llmfleet",
            "placements-TOTAL_FORMS": 0,
            "placements-INITIAL_FORMS": 0,
        },
    )
    assert response.status_code == 302, response.context["adminform"].errors
    added = ModelFactory._meta.model.objects.get()
    assert (added.engine_args, added.kind) == (["--dtype", "float32"], "embedding")


@pytest.mark.parametrize(("rank", "added"), [(8, True), (1024, False)])
def test_lora_adapters_can_be_added_in_the_admin_within_their_base_rank(staff_client, rank, added):
    base = ModelFactory(model_id="org/tiny")
    response = staff_client.post(
        reverse("admin:agents_model_add"),
        {
            "model_id": "org/tiny-sql", "source": "file:///srv/models/tiny-sql",
            "kind": "generate", "base": base.pk, "adapter_rank": rank, "size_bytes": 1,
            "gpu_memory_bytes": 0, "engine_args": "[]", "keep_alive": "00:10:00",
            "max_keep_alive": "01:00:00", "min_replicas": 0, "max_replicas": 1, "max_loras": 4,
            "enabled": "on", "owned_by": "llmfleet", "placements-TOTAL_FORMS": 0,
            "placements-INITIAL_FORMS": 0,
        },
    )  # fmt: skip
    if added:
        assert response.status_code == 302, response.context["adminform"].errors
        assert base.adapters.get().adapter_rank == 8
    else:
        assert "exceeds the 512" in str(response.context["adminform"].errors)


def test_adding_an_api_key_in_the_admin_shows_its_secret_once(staff_client):
    response = staff_client.post(
        reverse("admin:gateway_apikey_add"),
        {"name": "billing-app", "weight": 1, "priority_classes": "interactive,batch"},
        follow=True,
    )
    assert response.status_code == 200
    message = next(str(m) for m in response.context["messages"])
    raw_key = message.split(" is ")[1].split(" ")[0]
    key = ApiKey.objects.get()
    assert key.key_hash == hash_key(raw_key)
    assert raw_key.startswith(key.prefix)
    # Never again: the change page does not carry it.
    page = staff_client.get(reverse("admin:gateway_apikey_change", args=[key.pk])).content.decode()
    assert raw_key not in page


def test_revoke_admin_action(staff_client):
    key, _ = make_api_key()
    staff_client.post(
        reverse("admin:gateway_apikey_changelist"),
        {"action": "revoke", "_selected_action": [key.pk]},
    )
    key.refresh_from_db()
    assert key.revoked_at is not None
