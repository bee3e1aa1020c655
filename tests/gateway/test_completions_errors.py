"""Every refusal of the completion endpoints happens before anything goes upstream."""

from __future__ import annotations

import json

import pytest
from django.utils import timezone

from agents.choices import LoadOutcome
from agents.models import Model
from tests.factories import (
    AgentFactory,
    LoadEventFactory,
    ModelFactory,
    PlacementFactory,
    make_api_key,
)
from tests.gateway import calls
from tests.gateway.calls import error_of

pytestmark = pytest.mark.django_db

CHAT = "/v1/chat/completions"


@pytest.fixture
def key():
    ModelFactory(model_id="org/m")
    ModelFactory(model_id="org/secret")
    ModelFactory(model_id="org/off", enabled=False)
    _, raw = make_api_key("app")
    return raw


def post(client, raw_key, body, url=CHAT):
    return calls.post(client, raw_key, url, body)


def chat(**extra):
    return {"model": "org/m", "messages": [{"role": "user", "content": "hi"}], **extra}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ("{not json", None, "invalid_json"),
        ("[1, 2]", None, "invalid_json"),
        ({"messages": [{"role": "user", "content": "hi"}]}, "model", "missing_required_parameter"),
        (chat(model=7), "model", "invalid_type"),
        ({"model": "org/m"}, "messages", "missing_required_parameter"),
        (chat(messages="hi"), "messages", "invalid_type"),
        (chat(messages=[{"role": "wizard", "content": "hi"}]), "messages[0].role", "invalid_value"),
        (chat(max_tokens=0), "max_tokens", "invalid_value"),
        (chat(max_tokens=10**9), "max_tokens", "invalid_value"),
        (chat(max_tokens="100"), "max_tokens", "invalid_type"),
        (chat(max_completion_tokens=True), "max_completion_tokens", "invalid_type"),
        (chat(temperature=5), "temperature", "invalid_value"),
        (chat(stream="yes"), "stream", "invalid_type"),
        (chat(user=42), "user", "invalid_type"),
        (chat(model="org/m\x00"), "model", "invalid_value"),  # found by tests/gateway/test_fuzz.py
        (chat(keep_alive="soon"), "keep_alive", "invalid_value"),
        (chat(keep_alive="5x"), "keep_alive", "invalid_value"),
        (chat(keep_alive="m5"), "keep_alive", "invalid_value"),
        (chat(keep_alive=""), "keep_alive", "invalid_value"),
        (chat(keep_alive=True), "keep_alive", "invalid_type"),
        (chat(keep_alive=[300]), "keep_alive", "invalid_type"),
        (json.dumps(chat())[:-1] + ', "keep_alive": NaN}', "keep_alive", "invalid_value"),
    ],
)
def test_bad_bodies_are_400_naming_the_parameter(client, key, body, param, code):
    error = error_of(post(client, key, body), 400)
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error")


def test_completions_need_a_prompt_of_a_known_shape(client, key):
    assert (
        error_of(post(client, key, {"model": "org/m"}, "/v1/completions"), 400)["param"] == "prompt"
    )
    bad = post(client, key, {"model": "org/m", "prompt": {"a": 1}}, "/v1/completions")
    assert error_of(bad, 400)["code"] == "invalid_type"


def test_unknown_and_disabled_models_are_404(client, key):
    assert error_of(post(client, key, chat(model="org/nope")), 404)["code"] == "model_not_found"
    assert error_of(post(client, key, chat(model="org/off")), 404)["code"] == "model_not_found"


def test_a_model_the_key_may_not_use_is_403(client, key):
    _, scoped = make_api_key("scoped", ("org/m",))
    assert post(client, scoped, chat(model="org/secret")).status_code != 200
    assert (
        error_of(post(client, scoped, chat(model="org/secret")), 403)["code"] == "model_not_allowed"
    )


def test_a_body_over_the_limit_is_413(client, key, settings):
    settings.GATEWAY_MAX_BODY_BYTES = 2048
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 2048
    body = chat(messages=[{"role": "user", "content": "x" * 5000}])
    assert error_of(post(client, key, body), 413)["code"] == "request_too_large"


def test_a_cold_model_with_no_agent_to_load_it_is_503_with_retry_after(
    client, key, settings, caplog
):
    PlacementFactory(model=ModelFactory(model_id="org/other"), agent__state="DRAINING")
    response = post(client, key, chat())
    error = error_of(response, 503)
    assert error["code"] == "model_not_ready"
    assert error["message"].startswith("No GPU host can take the model `org/m` now.")
    assert response["X-Request-Id"] in error["message"]
    assert response["Retry-After"] == str(settings.GATEWAY_RETRY_AFTER_SECONDS)
    # The operators' log says why, under the same request id.
    assert f"request {response['X-Request-Id']}: no replica of org/m" in caplog.text
    assert "no agent that takes new work" in caplog.text


def test_a_cold_start_whose_loads_failed_tells_the_client_nothing_of_the_fleet(client, key, caplog):
    """The last load error names agents, store URIs and up to 25 lines of vLLM's log: the
    operators' (admin, load events, log), never the client's."""
    model = Model.objects.get(model_id="org/m")
    secret = "engine_exited: http://10.0.0.7:8100 azure://models/org/m Traceback (most recent"
    for name in ("a", "b"):
        LoadEventFactory(
            model=model, agent=AgentFactory(agent_id=f"gpu-{name}"),
            outcome=LoadOutcome.FAILED, finished_at=timezone.now(), error=secret,
        )  # fmt: skip
    response = post(client, key, chat())
    error = error_of(response, 503)
    assert error["message"].startswith("The model `org/m` could not be started")
    assert "10.0.0.7" not in response.content.decode()
    assert "azure://" not in response.content.decode()
    assert secret in caplog.text


def test_a_cold_model_waits_out_a_degraded_agent_before_saying_no_room(
    client, key, settings, monkeypatch, caplog
):
    """An agent that missed a heartbeat may be back with the next: the request asks again
    until the heartbeats' verdict is due, and the refusal then says what the agents are."""
    settings.HEARTBEAT_INTERVAL_SECONDS, settings.HEARTBEAT_OFFLINE_AFTER = 1, 1
    PlacementFactory(model=ModelFactory(model_id="org/other"), agent__state="DEGRADED")
    from agents import actions

    asked = []
    real = actions.ensure_placement

    def counting(model, *how):
        asked.append(model.model_id)
        return real(model, *how)

    monkeypatch.setattr(actions, "ensure_placement", counting)
    response = post(client, key, chat())
    error_of(response, 503)
    assert "(agents not taking work: 1 DEGRADED)" in caplog.text  # the operators' to read
    assert len(asked) > 1


def test_a_cold_start_past_its_deadline_is_503_with_retry_after(client, key, settings):
    settings.COLD_START_TIMEOUT_SECONDS = 1
    PlacementFactory(model=ModelFactory(model_id="org/other"))  # an agent, but no worker here
    response = post(client, key, chat())
    assert error_of(response, 503)["code"] == "model_not_ready"
    assert "did not finish loading within 1 s" in response.json()["error"]["message"]
    assert response["Retry-After"] == str(settings.GATEWAY_RETRY_AFTER_SECONDS)


def test_keys_and_methods(client, key):
    assert error_of(post(client, "llmf-wrong", chat()), 401)["code"] == "invalid_api_key"
    assert error_of(client.get(CHAT, HTTP_AUTHORIZATION=f"Bearer {key}"), 405)["code"] is None


def test_models_say_whether_they_are_warm(client, key):
    PlacementFactory(model=ModelFactory._meta.model.objects.get(model_id="org/m"))
    listed = client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {key}").json()["data"]
    assert {entry["id"]: entry["warm"] for entry in listed} == {"org/m": True, "org/secret": False}


def test_a_database_that_is_away_gives_503_in_openai_shape(client, key, monkeypatch):
    from django.db import OperationalError

    from controlplane.gateway import cache

    async def away(self, model):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(cache.Cache, "ready_placements", away)
    response = post(client, key, chat())
    assert error_of(response, 503)["code"] == "service_unavailable"
    assert response["Retry-After"]


def test_an_unexpected_failure_gives_500_in_openai_shape(client, key, monkeypatch):
    from controlplane.gateway import cache

    async def broken(self, model):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cache.Cache, "ready_placements", broken)
    assert error_of(post(client, key, chat()), 500)["type"] == "server_error"


@pytest.mark.parametrize(
    ("headers", "body", "param", "code"),
    [
        ({}, chat(priority_class="urgent"), "priority_class", "invalid_priority_class"),
        ({}, chat(priority_class=3), "priority_class", "invalid_type"),
        ({"HTTP_X_PRIORITY_CLASS": "vip"}, chat(), "priority_class", "invalid_priority_class"),
        ({"HTTP_X_QUEUE_TIMEOUT": "soon"}, chat(), None, "invalid_queue_timeout"),
        ({"HTTP_X_QUEUE_TIMEOUT": "0"}, chat(), None, "invalid_queue_timeout"),
        ({"HTTP_X_QUEUE_TIMEOUT": "inf"}, chat(), None, "invalid_queue_timeout"),
    ],
)
def test_bad_admission_asks_are_400(client, key, headers, body, param, code):
    response = client.post(CHAT, data=json.dumps(body), content_type="application/json",
                           HTTP_AUTHORIZATION=f"Bearer {key}", **headers)  # fmt: skip
    error = error_of(response, 400)
    assert (error["param"], error["code"]) == (param, code)


def test_a_class_the_key_was_not_given_is_400(client):
    ModelFactory(model_id="org/m")
    _, raw = make_api_key("batch-only", priority_classes="batch")
    error = error_of(post(client, raw, chat(priority_class="interactive")), 400)
    assert error["code"] == "priority_class_not_allowed"
    assert "may use: batch" in error["message"]
