"""/v1/responses and /v1/embeddings before anything goes upstream: their checks, the model's
kind, the stored-response routes, and how a Responses stream's usage is read."""

from __future__ import annotations

import base64
import json
import struct

import pytest

from agents.choices import ModelKind
from controlplane.gateway.apis import Api, usage_tokens
from controlplane.gateway.upstream import Meter, UsageScanner
from controlplane.gateway.validation import InvalidRequest, estimate_prompt_tokens, parse_request
from nodeagent.engines.simanswers import embedding_for
from tests.factories import ModelFactory, make_api_key
from tests.gateway.calls import error_of, post

RESPONSES = "/v1/responses"
EMBEDDINGS = "/v1/embeddings"


@pytest.fixture
def key(db):
    ModelFactory(model_id="org/m")
    ModelFactory(model_id="org/embed", kind=ModelKind.EMBEDDING)
    _, raw = make_api_key("app")
    return raw


def respond(**extra):
    return {"model": "org/m", "input": "hi", **extra}


def embed(**extra):
    return {"model": "org/embed", "input": "hi", **extra}


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ("{nope", None, "invalid_json"),
        ({"input": "hi"}, "model", "missing_required_parameter"),
        ({"model": "org/m"}, "input", "missing_required_parameter"),
        (respond(input=7), "input", "invalid_type"),
        (respond(input=[]), "input", "invalid_type"),
        (respond(input=["hi"]), "input[0]", "invalid_type"),
        (respond(input=[{"role": "wizard", "content": "hi"}]), "input[0].role", "invalid_value"),
        (respond(instructions=3), "instructions", "invalid_type"),
        (respond(max_output_tokens=0), "max_output_tokens", "invalid_value"),
        (respond(max_output_tokens=10**9), "max_output_tokens", "invalid_value"),
        (respond(temperature="hot"), "temperature", "invalid_type"),
        (respond(stream="yes"), "stream", "invalid_type"),
        (respond(store="yes"), "store", "invalid_type"),
        (respond(previous_response_id="resp_1"), "previous_response_id", "unsupported_parameter"),
        (respond(background=True), "background", "unsupported_parameter"),
        (respond(keep_alive="soon"), "keep_alive", "invalid_value"),
    ],
)
def test_bad_responses_bodies_are_400_naming_the_field(client, key, body, param, code):
    error = error_of(post(client, key, RESPONSES, body), 400)
    assert (error["param"], error["code"]) == (param, code)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "org/embed"}, "input", "missing_required_parameter"),
        (embed(input=[]), "input", "invalid_type"),
        (embed(input=[[]]), "input", "invalid_type"),
        (embed(input=["a", 1]), "input", "invalid_type"),
        (embed(input={"text": "a"}), "input", "invalid_type"),
        (embed(encoding_format="hex"), "encoding_format", "invalid_value"),
        (embed(dimensions=0), "dimensions", "invalid_value"),
        (embed(stream=True), "stream", "invalid_value"),
        (embed(user=5), "user", "invalid_type"),
    ],
)
def test_bad_embeddings_bodies_are_400_naming_the_field(client, key, body, param, code):
    error = error_of(post(client, key, EMBEDDINGS, body), 400)
    assert (error["param"], error["code"]) == (param, code)


@pytest.mark.parametrize(
    ("url", "body", "kind", "served_at"),
    [
        (EMBEDDINGS, embed(model="org/m"), "generate", "/v1/chat/completions"),
        (RESPONSES, respond(model="org/embed"), "embedding", "/v1/embeddings"),
        (
            "/v1/chat/completions",
            {"model": "org/embed", "messages": [{"role": "user", "content": "hi"}]},
            "embedding",
            "/v1/embeddings",
        ),
        ("/v1/completions", {"model": "org/embed", "prompt": "hi"}, "embedding", "/v1/embeddings"),
    ],
)
def test_a_model_of_the_other_kind_is_400_naming_its_kind(client, key, url, body, kind, served_at):
    error = error_of(post(client, key, url, body), 400)
    assert (error["param"], error["code"]) == ("model", "wrong_model_kind")
    assert f"(kind `{kind}`)" in error["message"]
    assert served_at in error["message"]


def test_unknown_models_and_bad_keys_are_refused_as_on_chat(client, key):
    assert error_of(post(client, key, EMBEDDINGS, embed(model="org/nope")), 404)["code"] == (
        "model_not_found"
    )
    assert error_of(post(client, "sk-wrong", RESPONSES, respond()), 401)["code"] == (
        "invalid_api_key"
    )
    assert error_of(client.get(EMBEDDINGS, HTTP_AUTHORIZATION=f"Bearer {key}"), 405)


@pytest.mark.parametrize("method", ["get", "delete"])
def test_a_stored_response_is_never_found_and_the_404_says_why(client, key, method):
    response = getattr(client, method)(f"{RESPONSES}/resp_abc", HTTP_AUTHORIZATION=f"Bearer {key}")
    error = error_of(response, 404)
    assert error["code"] == "response_not_found"
    assert "does not store responses" in error["message"]
    cancel = post(client, key, f"{RESPONSES}/resp_abc/cancel", {})
    assert error_of(cancel, 404)["code"] == "response_not_found"
    assert error_of(getattr(client, method)(f"{RESPONSES}/resp_abc"), 401)["code"] == (
        "missing_api_key"
    )


def test_valid_bodies_pass_with_their_bytes_and_keep_alive_is_taken_out():
    raw = b'{"model": "m", "input": [{"role": "user", "content": "hi"}], "max_output_tokens": 9}'
    parsed = parse_request(raw, Api.RESPONSES, max_tokens=100)
    assert (parsed.raw, parsed.stream, parsed.keep_alive) == (raw, False, None)
    for value in ("a", ["a", "b"], [1, 2, 3], [[1, 2], [3]]):
        body = {"model": "m", "input": value, "encoding_format": "base64", "keep_alive": "5m"}
        parsed = parse_request(json.dumps(body).encode(), Api.EMBEDDINGS, max_tokens=100)
        assert parsed.keep_alive == 300
        assert "keep_alive" not in json.loads(parsed.raw)
    with pytest.raises(InvalidRequest):
        parse_request(b'{"model": "m", "prompt": "hi"}', Api.RESPONSES, max_tokens=100)


def test_the_prompt_estimate_reads_responses_input_and_instructions():
    body = {"instructions": "x" * 40, "input": [{"role": "user", "content": "y" * 360}]}
    assert estimate_prompt_tokens(body) == 100
    assert estimate_prompt_tokens({"input": ["z" * 8, "w" * 8]}) == 4


def _event(kind: str, data: dict) -> bytes:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode()


CREATED = _event("response.created", {"response": {"id": "r", "usage": None}})
DELTA = _event("response.output_text.delta", {"delta": "hi", "sequence_number": 4})
COMPLETED = _event(
    "response.completed",
    {"response": {"id": "r", "usage": {"input_tokens": 9, "output_tokens": 2}}},
)


@pytest.mark.parametrize("split", [1, 13, 64, 4096])
def test_a_responses_stream_passes_unchanged_and_its_last_event_is_the_usage(split):
    stream = CREATED + DELTA + DELTA + COMPLETED
    heard: list[dict] = []
    scanner = UsageScanner(False, Meter(heard.append, 1), Api.RESPONSES)
    pieces = [stream[i : i + split] for i in range(0, len(stream), split)]
    relayed = b"".join(scanner.feed(piece) for piece in pieces) + scanner.rest()
    assert relayed == stream
    scanner.meter.settle()
    assert heard == [{"input_tokens": 9, "output_tokens": 2}]
    assert usage_tokens(heard[0]) == (9, 2)


def test_a_responses_stream_cut_short_is_charged_its_output_events():
    heard: list[dict] = []
    meter = Meter(heard.append, prompt_estimate=5)
    scanner = UsageScanner(False, meter, Api.RESPONSES)
    scanner.feed(CREATED + DELTA + DELTA + DELTA[:9])
    meter.settle()
    assert heard == [{"prompt_tokens": 5, "completion_tokens": 2}]


def test_a_responses_error_event_is_typed_and_the_sdks_raise_on_it():
    event = Api.RESPONSES.error_event("gone", code="upstream_failed")
    name, data = event.decode().strip().split("\n")
    assert name == "event: error"
    payload = json.loads(data.removeprefix("data: "))
    assert (payload["type"], payload["code"], payload["message"]) == ("error", "upstream_failed",
                                                                      "gone")  # fmt: skip
    assert payload["error"]["message"] == "gone"  # what openai's Stream raises APIError on
    assert Api.RESPONSES.is_error(DELTA + event)
    assert not Api.RESPONSES.is_error(DELTA)
    assert Api.RESPONSES.has_output(CREATED + DELTA)
    assert not Api.RESPONSES.has_output(CREATED)
    assert Api.CHAT.error_event("gone").endswith(b"data: [DONE]\n\n")


def test_usage_tokens_reads_either_apis_names_and_ignores_garbage():
    assert usage_tokens({"prompt_tokens": 3, "completion_tokens": 4}) == (3, 4)
    assert usage_tokens({"prompt_tokens": 6, "total_tokens": 6}) == (6, 0)  # embeddings
    assert usage_tokens({"input_tokens": "7", "output_tokens": -1}) == (0, 0)


def test_the_sim_embedding_is_a_deterministic_unit_vector():
    vector = embedding_for("hello", 8)
    assert vector == embedding_for("hello", 8) != embedding_for("hullo", 8)
    assert abs(sum(x * x for x in vector) - 1) < 1e-9
    packed = base64.b64encode(struct.pack("<8f", *vector))
    assert len(struct.unpack("<8f", base64.b64decode(packed))) == 8
