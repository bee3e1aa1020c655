from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

from agents.choices import AgentState, CacheLevel, PlacementState
from agents.models import Model
from tests.factories import AgentFactory, ModelFactory, PlacementFactory

pytestmark = pytest.mark.django_db


def send(client: Client, method: str, url: str, body: object) -> object:
    return getattr(client, method)(url, data=json.dumps(body), content_type="application/json")


@pytest.mark.parametrize("url", ["/api/agents/", "/api/models/", "/api/placements/"])
def test_the_fleet_api_is_for_staff_only(client, url):
    assert client.get(url).status_code == 403
    user = get_user_model().objects.create_user("dev", password="pw-long-enough-1")
    client.force_login(user)
    assert client.get(url).status_code == 403


def test_agents_list_and_detail(staff_client):
    agent = AgentFactory(agent_id="gpu-1.example")
    PlacementFactory(agent=agent, model=ModelFactory(model_id="org/m"))

    listing = staff_client.get("/api/agents/").json()
    assert listing["count"] == 1
    assert listing["results"][0]["agent_id"] == "gpu-1.example"

    detail = staff_client.get("/api/agents/gpu-1.example/").json()
    assert detail["placements"] == [
        {
            "model": "org/m",
            "state": "READY",
            "cache_level": "GPU_RESIDENT",
            "progress": None,
            "requests_in_flight": 0,
            "last_used_at": None,
        }
    ]
    assert staff_client.get("/api/agents/nope/").status_code == 404


def test_agents_cannot_be_written_through_the_api(staff_client):
    AgentFactory(agent_id="a1")
    assert send(staff_client, "post", "/api/agents/", {"agent_id": "x"}).status_code == 405
    assert staff_client.delete("/api/agents/a1/").status_code == 405


def test_drain_and_undrain_through_the_api(staff_client):
    AgentFactory(agent_id="a1", state=AgentState.IDLE)
    assert staff_client.post("/api/agents/a1/drain/").json()["state"] == "DRAINING"
    assert staff_client.post("/api/agents/a1/undrain/").json()["state"] == "IDLE"
    assert staff_client.post("/api/agents/missing/drain/").status_code == 404


def test_models_crud_with_slashes_in_ids(staff_client):
    body = {
        "model_id": "meta-llama/Llama-3.1-8B-Instruct",
        "source": "azure://models/meta-llama/Llama-3.1-8B-Instruct",
        "size_bytes": 16_000_000_000,
        "engine_args": ["--max-model-len", "8192"],
        "keep_alive": "00:15:00",
        "max_replicas": 4,
    }
    created = send(staff_client, "post", "/api/models/", body)
    assert created.status_code == 201, created.json()
    url = "/api/models/meta-llama/Llama-3.1-8B-Instruct/"
    assert staff_client.get(url).json()["keep_alive"] == "00:15:00"

    patched = send(staff_client, "patch", url, {"enabled": False, "min_replicas": 2})
    assert patched.status_code == 200, patched.json()
    assert Model.objects.get().min_replicas == 2

    assert staff_client.delete(url).status_code == 204
    assert not Model.objects.exists()


def test_invalid_models_get_per_field_errors(staff_client):
    ModelFactory(model_id="taken")
    body = {
        "model_id": "taken",
        "source": "hdfs://bucket/x",
        "engine_args": "--dtype float32",
        "size_bytes": -1,
        "max_replicas": 0,
    }
    response = send(staff_client, "post", "/api/models/", body)
    assert response.status_code == 400
    assert set(response.json()) == {
        "model_id",
        "source",
        "engine_args",
        "size_bytes",
        "max_replicas",
    }


def test_a_patch_cannot_put_max_replicas_below_min_replicas(staff_client):
    ModelFactory(model_id="m", min_replicas=2, max_replicas=3)
    response = send(staff_client, "patch", "/api/models/m/", {"max_replicas": 1})
    assert response.status_code == 400
    assert "max_replicas" in response.json()


def test_malformed_json_to_the_models_api_is_a_400(staff_client):
    response = staff_client.post("/api/models/", data="{oops", content_type="application/json")
    assert response.status_code == 400
    assert not Model.objects.exists()


def test_placements_are_read_only_and_filterable(staff_client):
    model = ModelFactory(model_id="org/a")
    PlacementFactory(model=model, agent=AgentFactory(agent_id="h1"))
    PlacementFactory(
        model=model, agent=AgentFactory(agent_id="h2"), state=PlacementState.DOWNLOADING
    )
    PlacementFactory(agent=AgentFactory(agent_id="h3"), cache_level=CacheLevel.NVME_CACHED)

    def agents_for(query: str) -> list[str]:
        return [
            row["agent"] for row in staff_client.get(f"/api/placements/{query}").json()["results"]
        ]

    assert sorted(agents_for("")) == ["h1", "h2", "h3"]
    assert agents_for("?model=org/a&state=READY") == ["h1"]
    assert agents_for("?cache_level=NVME_CACHED") == ["h3"]
    assert agents_for("?agent=h2") == ["h2"]
    assert send(staff_client, "post", "/api/placements/", {}).status_code == 405


def test_openapi_schema_describes_the_fleet_api(staff_client):
    response = staff_client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    assert "/api/agents/register" in paths
    assert "/api/models/{model_id}/" in paths
    assert "/api/placements/" in paths


def test_the_schema_is_public(client):
    assert client.get("/api/schema/").status_code == 200


def test_a_path_no_route_matches_is_a_json_404_under_api(client):
    response = client.get("/api/agents/%C3%A9%00/drain/")
    assert response.status_code == 404
    assert response.json() == {"detail": "Not found."}


def test_a_null_character_in_a_filter_is_a_400_not_a_500(staff_client):
    response = staff_client.get("/api/placements/", {"model": "org/\x00m"})
    assert response.status_code == 400
    assert "model" in response.json()
