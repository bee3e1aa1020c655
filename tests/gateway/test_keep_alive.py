"""`keep_alive` in a request: how it reads, what it is granted, and that it stays out of the
engine's body."""

from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest

from controlplane.gateway.actions import granted_keep_alive
from controlplane.gateway.apis import Api
from controlplane.gateway.validation import InvalidRequest, parse_keep_alive, parse_request
from tests.factories import ModelFactory


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (300, 300.0),
        (0, 0.0),
        (1.5, 1.5),
        ("300", 300.0),
        ("0", 0.0),
        ("5m", 300.0),
        ("1h30m", 5400.0),
        ("90s", 90.0),
        ("1.5h", 5400.0),
        ("500ms", 0.5),
        (" 2m ", 120.0),
        (-1, math.inf),
        ("-1", math.inf),
        ("-5m", math.inf),
    ],
)
def test_seconds_and_durations_read_as_ollama_clients_send_them(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5x", "m5", "", "5m3", "1h-2m", "--1", True, [], {}])
def test_anything_else_is_refused(value):
    with pytest.raises(InvalidRequest) as raised:
        parse_keep_alive(value)
    assert raised.value.param == "keep_alive"


def test_keep_alive_is_parsed_and_never_sent_to_the_engine():
    body = {"model": "m", "prompt": "hi", "keep_alive": "2m", "max_tokens": 3}
    parsed = parse_request(json.dumps(body).encode(), Api.COMPLETIONS, max_tokens=100)
    assert parsed.keep_alive == 120.0
    assert json.loads(parsed.raw) == {"model": "m", "prompt": "hi", "max_tokens": 3}
    assert "keep_alive" not in parsed.body


def test_a_body_without_keep_alive_goes_upstream_byte_for_byte():
    raw = b'{"model": "m",   "prompt": "hi", "max_tokens": 4}'
    parsed = parse_request(raw, Api.COMPLETIONS, max_tokens=100)
    assert (parsed.raw, parsed.keep_alive) == (raw, None)
    null = parse_request(b'{"model": "m", "prompt": "hi", "keep_alive": null}', Api.COMPLETIONS,
                         max_tokens=100)  # fmt: skip
    assert null.keep_alive is None
    assert json.loads(null.raw) == {"model": "m", "prompt": "hi", "max_tokens": 100}


@pytest.mark.django_db
def test_what_is_granted_is_capped_at_the_model_maximum():
    model = ModelFactory(max_keep_alive=timedelta(minutes=30))
    assert granted_keep_alive(0, model) == timedelta(0)
    assert granted_keep_alive(600, model) == timedelta(minutes=10)
    assert granted_keep_alive(7200, model) == timedelta(minutes=30)
    assert granted_keep_alive(math.inf, model) == timedelta(minutes=30)


def test_a_request_without_a_cap_gets_the_default_and_priority_class_is_taken_out():
    """Without a cap vLLM generates to the end of the context; the gateway writes one in."""
    chat = b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'
    parsed = parse_request(chat, Api.CHAT, max_tokens=100, default_max_tokens=40)
    assert (json.loads(parsed.raw)["max_tokens"], parsed.max_tokens) == (40, 40)
    capped = chat[:-1] + b', "max_completion_tokens": 7}'
    assert parse_request(capped, Api.CHAT, max_tokens=100, default_max_tokens=40).max_tokens == 7
    responses = parse_request(b'{"model": "m", "input": "hi"}', Api.RESPONSES, max_tokens=30,
                              default_max_tokens=40)  # fmt: skip
    assert json.loads(responses.raw)["max_output_tokens"] == 30  # never past GATEWAY_MAX_TOKENS
    embeddings = parse_request(b'{"model": "m", "input": "hi"}', Api.EMBEDDINGS, max_tokens=30)
    assert (embeddings.raw, embeddings.max_tokens) == (b'{"model": "m", "input": "hi"}', 0)
    asked = b'{"model": "m", "prompt": "hi", "max_tokens": 3, "priority_class": "batch"}'
    batch = parse_request(asked, Api.COMPLETIONS, max_tokens=30)
    assert batch.priority_class == "batch"
    assert "priority_class" not in json.loads(batch.raw)
