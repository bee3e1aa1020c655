"""A key's allow-list can only narrow: "every model" is the key's explicit choice."""

from __future__ import annotations

import json

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from tests.factories import ModelFactory, make_api_key

pytestmark = pytest.mark.django_db


def bearer(raw_key: str) -> dict[str, str]:
    return {"HTTP_AUTHORIZATION": f"Bearer {raw_key}"}


def listed(client, raw_key: str) -> list[str]:
    response = client.get("/v1/models", **bearer(raw_key))
    assert response.status_code == 200
    return [model["id"] for model in response.json()["data"]]


def test_deleting_the_only_model_a_key_was_limited_to_leaves_it_no_model(client):
    only = ModelFactory(model_id="org/only")
    ModelFactory(model_id="org/other")
    key, raw_key = make_api_key("narrow", ("org/only",))
    assert key.all_models is False
    assert listed(client, raw_key) == ["org/only"]

    only.delete()

    assert listed(client, raw_key) == []
    response = client.post(
        "/v1/chat/completions",
        data=json.dumps({"model": "org/other", "messages": [{"role": "user", "content": "hi"}]}),
        content_type="application/json",
        **bearer(raw_key),
    )
    assert response.status_code in (403, 404)
    assert response.json()["error"]["code"] in ("model_not_allowed", "model_not_found")


def test_a_key_for_every_model_sees_models_added_later(client):
    key, raw_key = make_api_key("wide")
    assert key.all_models is True
    ModelFactory(model_id="org/later")
    assert listed(client, raw_key) == ["org/later"]


def test_the_migration_keeps_keys_that_had_no_list_on_every_model():
    executor = MigrationExecutor(connection)
    before = [("gateway", "0003_request_minute")]
    after = [("gateway", "0004_api_key_all_models")]
    executor.migrate(before)
    old = executor.loader.project_state(before).apps
    OldKey = old.get_model("gateway", "ApiKey")
    OldModel = old.get_model("agents", "Model")
    OldKey.objects.create(name="wide", prefix="a", key_hash="a" * 64)
    narrow = OldKey.objects.create(name="narrow", prefix="b", key_hash="b" * 64)
    narrow.allowed_models.add(OldModel.objects.create(model_id="org/m", source="file:///m"))
    executor = MigrationExecutor(connection)
    executor.loader.build_graph()
    executor.migrate(after)
    NewKey = executor.loader.project_state(after).apps.get_model("gateway", "ApiKey")
    assert NewKey.objects.get(name="wide").all_models is True
    assert NewKey.objects.get(name="narrow").all_models is False
