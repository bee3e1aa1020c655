"""The agent's HTTP surface past a load: its token, malformed bodies, the proxy to the engine
(streams, errors, a dead engine, a client gone) and /metrics."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from nodeagent.engines.sim import SimEngine
from nodeagent.engines.simanswers import words_for
from nodeagent.protocol import AGENT_ERROR_HEADER
from tests.nodeagent.conftest import TOKEN, load_body


@pytest.mark.parametrize(
    "path", ["/load_model", "/unload_model", "/heartbeat", "/metrics", "/models/m/v1/models"]
)
@pytest.mark.parametrize("authorization", [None, "Bearer wrong", f"Basic {TOKEN}"])
async def test_every_endpoint_but_healthz_needs_the_token(agent, path, authorization):
    headers = {} if authorization is None else {"Authorization": authorization}
    method = agent.http.get if path in {"/metrics", "/models/m/v1/models"} else agent.http.post
    async with method(f"{agent.url}{path}", headers=headers, json={}) as response:
        assert response.status == 401
        body = await response.json()
    assert body["error"]["code"] == "unauthorized"
    async with agent.http.get(f"{agent.url}/healthz") as response:
        assert response.status == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{not json", "malformed JSON"),
        ("", "the body is empty"),
        ('{"model_id": "m"}', "'source' is required"),
        (
            '{"model_id": "m", "source": "file:///x", "engine": {"name": "tgi"}}',
            "'engine.name' must be one of",
        ),
    ],
)
async def test_malformed_bodies_are_400_with_the_reason(agent, body, message):
    async with agent.http.post(
        f"{agent.url}/load_model", data=body, headers=agent.headers
    ) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert (error["code"], message in error["message"]) == ("bad_request", True)
    assert agent.server.registry.slots == {}


async def test_the_official_openai_client_streams_through_the_proxy(agent, tiny_model):
    _, loaded = await agent.post("/load_model", load_body(tiny_model))
    client = openai.AsyncOpenAI(base_url=f"{loaded['inference_endpoint_url']}/v1", api_key=TOKEN)
    stream = await client.chat.completions.create(
        model="org/tiny",
        messages=[{"role": "user", "content": "hello there"}],
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    parts, usage = [], None
    async for chunk in stream:
        parts += [choice.delta.content or "" for choice in chunk.choices]
        usage = chunk.usage or usage
    await client.close()
    assert "".join(parts) == " ".join(words_for("hello there", 6))
    assert usage is not None
    assert usage.completion_tokens == 6
    slot = agent.server.registry.slots["org/tiny"]
    assert slot.in_flight == 0
    assert slot.last_used is not None
    assert agent.server.metrics.proxy_requests.labels("2xx")._value.get() == 1


async def test_engine_errors_pass_through_with_their_status(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    url = f"{agent.url}/models/org/tiny/v1/chat/completions"
    async with agent.http.post(
        url, json={"model": "org/other", "messages": []}, headers=agent.headers
    ) as response:
        assert response.status == 404
        assert "does not exist" in (await response.json())["error"]["message"]


async def test_an_engine_whose_core_died_is_never_relayed_as_its_answer(agent, tiny_model):
    """vLLM's API server outlives its EngineCore (a worker OOM-killed) and answers 500 to
    everything: the agent says its engine is unreachable (the gateway fails the request over)
    and reports the model FAILED, instead of relaying a 500 as the engine's verdict."""
    await agent.post("/load_model", load_body(tiny_model))
    engine = agent.server.registry.slots["org/tiny"].engine
    assert isinstance(engine, SimEngine)
    engine.kill_core()
    url = f"{agent.url}/models/org/tiny/v1/chat/completions"
    body = {"model": "org/tiny", "messages": [{"role": "user", "content": "hi"}]}
    async with agent.http.post(url, json=body, headers=agent.headers) as response:
        assert response.status == 502
        assert response.headers[AGENT_ERROR_HEADER] == "engine_unreachable"
    model = agent.model(await agent.heartbeat(), "org/tiny")
    assert model["cache_state"] == "FAILED"
    assert "engine died" in model["error"]
    # A load serves it again, with a new engine.
    status, loaded = await agent.post("/load_model", load_body(tiny_model))
    assert status == 200, loaded
    async with agent.http.post(url, json=body, headers=agent.headers) as response:
        assert response.status == 200


async def test_an_engine_error_from_a_live_engine_is_its_answer(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    url = f"{agent.url}/models/org/tiny/v1/chat/completions"
    async with agent.http.post(url, data=b"{not json", headers=agent.headers) as response:
        assert response.status == 400  # the engine's own verdict: relayed as it is
        assert AGENT_ERROR_HEADER not in response.headers


async def test_proxy_to_a_model_that_is_not_ready(agent, tiny_model):
    async with agent.http.get(
        f"{agent.url}/models/org/tiny/v1/models", headers=agent.headers
    ) as response:
        assert response.status == 404
        assert (await response.json())["error"]["code"] == "model_not_found"
    await agent.post("/load_model", load_body(tiny_model))
    await agent.post("/unload_model", {"model_id": "org/tiny", "to": "DRAM_CACHED"})
    async with agent.http.get(
        f"{agent.url}/models/org/tiny/v1/models", headers=agent.headers
    ) as response:
        assert response.status == 503
        assert (await response.json())["error"]["code"] == "model_not_ready"


async def test_a_client_that_disconnects_cancels_the_engine_request(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    engine = agent.server.registry.slots["org/tiny"].engine
    body = {
        "model": "org/tiny",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 5000,
        "stream": True,
    }
    async with aiohttp.ClientSession() as client:
        response = await client.post(
            f"{agent.url}/models/org/tiny/v1/chat/completions", json=body, headers=agent.headers
        )
        await response.content.readline()
        assert engine.server.counters.running == 1
        assert agent.server.registry.slots["org/tiny"].in_flight == 1
        response.close()
    for _ in range(100):
        if engine.server.counters.running == 0:
            break
        await asyncio.sleep(0.02)
    assert engine.server.counters.running == 0
    assert engine.server.counters.generation_tokens < 5000
    assert agent.server.registry.slots["org/tiny"].in_flight == 0


async def test_metrics_endpoint_exposes_agent_series(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    async with agent.http.get(f"{agent.url}/metrics", headers=agent.headers) as response:
        text = await response.text()
    started = 'llmfleet_agent_engine_starts_total{engine="sim",outcome="ready",start="plain"} 1.0'
    assert started in text
    assert 'llmfleet_agent_models{cache_level="GPU_RESIDENT"} 1.0' in text
    assert "llmfleet_agent_download_bytes_total 1.8" in text
    assert 'llmfleet_agent_downloads_total{outcome="complete"} 1.0' in text
    # The engine's own prefix-cache counters, read at the scrape: a 32-token prompt twice.
    prompt = " ".join(f"w{n}" for n in range(32))
    body = {"model": "org/tiny", "messages": [{"role": "user", "content": prompt}], "max_tokens": 2}
    for _ in range(2):
        async with agent.http.post(f"{agent.url}/models/org/tiny/v1/chat/completions", json=body,
                                   headers=agent.headers) as response:  # fmt: skip
            assert response.status == 200
    async with agent.http.get(f"{agent.url}/metrics", headers=agent.headers) as response:
        text = await response.text()
    assert 'llmfleet_agent_engine_prefix_cache_queries{model="org/tiny"} 64.0' in text
    assert 'llmfleet_agent_engine_prefix_cache_hits{model="org/tiny"} 32.0' in text
    # And the engine's own time to first token, as a histogram of the agent's.
    ttft = "llmfleet_agent_engine_time_to_first_token_seconds"
    assert f'{ttft}_bucket{{le="+Inf",model="org/tiny"}} 2.0' in text
    assert f'{ttft}_count{{model="org/tiny"}} 2.0' in text
