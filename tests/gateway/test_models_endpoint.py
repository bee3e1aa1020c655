from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from agents.choices import ModelKind
from controlplane.gateway import actions
from tests.factories import ModelFactory, make_api_key

pytestmark = pytest.mark.django_db

URL = "/v1/models"


def bearer(raw_key: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {raw_key}"}


def assert_openai_error(response, status: int, code: str | None) -> None:
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    assert body["error"]["code"] == code


def test_lists_enabled_models_in_openai_shape(client):
    first = ModelFactory(model_id="a/first")
    ModelFactory(model_id="b/second", owned_by="acme", kind=ModelKind.EMBEDDING)
    ModelFactory(model_id="c/disabled", enabled=False)
    _, raw_key = make_api_key()

    response = client.get(URL, **bearer(raw_key))

    assert response.status_code == 200
    assert response.json() == {
        "object": "list",
        "data": [
            {
                "id": "a/first",
                "object": "model",
                "created": int(first.created_at.timestamp()),
                "owned_by": "llmfleet",
                "kind": "generate",
                "warm": False,
                "parent": None,
            },
            {
                "id": "b/second",
                "object": "model",
                "created": response.json()["data"][1]["created"],
                "owned_by": "acme",
                "kind": "embedding",
                "warm": False,
                "parent": None,
            },
        ],
    }


def test_a_key_with_an_allow_list_sees_only_its_models(client):
    ModelFactory(model_id="allowed")
    ModelFactory(model_id="other")
    ModelFactory(model_id="allowed-but-disabled", enabled=False)
    _, raw_key = make_api_key("scoped", ("allowed", "allowed-but-disabled"))
    make_api_key("unscoped")  # another key's grants change nothing

    ids = [entry["id"] for entry in client.get(URL, **bearer(raw_key)).json()["data"]]
    assert ids == ["allowed"]


def test_missing_key_is_401(client):
    response = client.get(URL)
    assert_openai_error(response, 401, "missing_api_key")
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize("header", ["Bearer llmf-not-a-real-key", "Basic abc", "Bearer"])
def test_unknown_or_malformed_key_is_401(client, header):
    response = client.get(URL, HTTP_AUTHORIZATION=header)
    assert_openai_error(
        response, 401, "invalid_api_key" if header.endswith("key") else "missing_api_key"
    )


def test_revoked_key_is_401(client):
    key, raw_key = make_api_key()
    assert client.get(URL, **bearer(raw_key)).status_code == 200
    actions.revoke_api_keys([key.pk])
    assert_openai_error(client.get(URL, **bearer(raw_key)), 401, "revoked_api_key")


def test_expired_key_is_401(client):
    _, raw_key = make_api_key(expires_at=timezone.now() - timedelta(seconds=1))
    assert_openai_error(client.get(URL, **bearer(raw_key)), 401, "expired_api_key")


def test_wrong_method_is_405_in_openai_shape(client):
    _, raw_key = make_api_key()
    assert_openai_error(client.post(URL, **bearer(raw_key)), 405, None)


def test_unknown_v1_route_is_404_in_openai_shape(client):
    assert_openai_error(client.get("/v1/engines"), 404, "unknown_url")


def test_one_model_is_retrieved_in_openai_shape_by_an_id_with_slashes(client):
    model = ModelFactory(model_id="org/family/tiny", owned_by="acme")
    _, raw_key = make_api_key()

    response = client.get(f"{URL}/org/family/tiny", **bearer(raw_key))

    assert response.status_code == 200
    assert response.json() == {
        "id": "org/family/tiny",
        "object": "model",
        "created": int(model.created_at.timestamp()),
        "owned_by": "acme",
        "kind": "generate",
        "warm": False,
        "parent": None,
    }


def test_an_unknown_disabled_or_not_allowed_model_is_404_to_retrieve(client):
    ModelFactory(model_id="allowed")
    ModelFactory(model_id="other")
    ModelFactory(model_id="off", enabled=False)
    _, raw_key = make_api_key("scoped", ("allowed", "off"))

    assert client.get(f"{URL}/allowed", **bearer(raw_key)).status_code == 200
    for model_id in ("other", "off", "nothing/here"):
        response = client.get(f"{URL}/{model_id}", **bearer(raw_key))
        assert_openai_error(response, 404, "model_not_found")
        assert model_id in response.json()["error"]["message"]


def test_retrieving_needs_a_key_and_get(client):
    ModelFactory(model_id="m")
    _, raw_key = make_api_key()
    assert_openai_error(client.get(f"{URL}/m"), 401, "missing_api_key")
    assert_openai_error(client.delete(f"{URL}/m", **bearer(raw_key)), 405, None)
