from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from nodeagent.cache import ModelCache
from nodeagent.engines.sim import SimEngine
from nodeagent.engines.simanswers import words_for
from nodeagent.protocol import AGENT_ERROR_HEADER, HeartbeatResponse
from tests.nodeagent.conftest import TOKEN, sim_args, start_agent
from tests.support import until


def load_body(tiny_model, model_id: str = "org/tiny", **extra) -> dict:
    return {"model_id": model_id, "source": tiny_model.as_uri(), **extra}


def starts(agent) -> float:
    return agent.server.metrics.engine_starts.labels("sim", "ready", "plain")._value.get()


async def test_load_serves_the_model_and_the_heartbeat_says_so(agent, tiny_model):
    status, body = await agent.post("/load_model", load_body(tiny_model))
    assert status == 200, body
    assert body["status"] == "success"
    assert body["inference_endpoint_url"] == f"{agent.url}/models/org/tiny"
    assert (body["cache_state"], body["cache_level"]) == ("READY", "GPU_RESIDENT")
    assert body["timings"]["files_cached"] is False
    assert body["timings"]["engine_start_seconds"] > 0

    heartbeat = await agent.heartbeat()
    HeartbeatResponse.from_json(heartbeat)  # the documented shape, field for field
    assert heartbeat["agent_id"] == "test-agent"
    assert heartbeat["state"] == "IDLE"
    assert heartbeat["gpus"] == []  # no GPU here: nothing invented
    model = agent.model(heartbeat, "org/tiny")
    assert (model["cache_state"], model["engine"], model["progress"]) == ("READY", "sim", 1.0)
    assert model["kv_cache_usage"] == 0.0
    assert heartbeat["disk"]["models_bytes"] > 1_000_000


async def test_concurrent_loads_start_one_engine_and_get_the_same_answer(agent, tiny_model):
    answers = await asyncio.gather(
        *(agent.post("/load_model", load_body(tiny_model)) for _ in range(5))
    )
    assert {status for status, _ in answers} == {200}
    assert len({json.dumps(body, sort_keys=True) for _, body in answers}) == 1
    assert starts(agent) == 1


async def test_loading_a_ready_model_again_is_instant(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    status, body = await agent.post("/load_model", load_body(tiny_model))
    assert status == 200
    assert body["timings"] == {
        "download_seconds": None, "engine_start_seconds": None, "wake_seconds": None,
        "total_seconds": 0.0, "files_cached": True, "engine_start": "", "engine_start_note": "",
        "compile_cache": "", "source": load_body(tiny_model)["source"], "download_bytes": 0,
    }  # fmt: skip
    assert starts(agent) == 1


async def test_dram_cached_sleeps_and_a_load_wakes_it_without_a_restart(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    engine = agent.server.registry.slots["org/tiny"].engine

    status, body = await agent.post("/unload_model", {"model_id": "org/tiny", "to": "DRAM_CACHED"})
    assert (status, body["cache_state"], body["cache_level"], body["note"]) == (
        200,
        "UNLOADED",
        "DRAM_CACHED",
        "",
    )
    assert engine.server.sleeping
    model = agent.model(await agent.heartbeat(), "org/tiny")
    assert (model["cache_state"], model["cache_level"], model["inference_endpoint_url"]) == (
        "UNLOADED",
        "DRAM_CACHED",
        "",
    )

    status, body = await agent.post("/load_model", load_body(tiny_model))
    assert status == 200
    assert body["timings"]["wake_seconds"] >= 0.05
    assert body["timings"]["engine_start_seconds"] is None
    assert agent.server.registry.slots["org/tiny"].engine is engine
    assert not engine.server.sleeping
    assert starts(agent) == 1


async def test_nvme_cached_stops_the_engine_and_a_load_restarts_it_from_the_cache(
    agent, tiny_model
):
    await agent.post("/load_model", load_body(tiny_model))
    status, body = await agent.post("/unload_model", {"model_id": "org/tiny", "to": "NVME_CACHED"})
    assert (status, body["cache_level"]) == (200, "NVME_CACHED")
    assert agent.server.registry.slots["org/tiny"].engine is None

    status, body = await agent.post("/load_model", load_body(tiny_model))
    assert status == 200
    assert body["timings"]["files_cached"] is True
    assert body["timings"]["download_seconds"] is None
    assert starts(agent) == 2


async def test_unload_to_none_deletes_the_files(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    directory = agent.server.registry.slots["org/tiny"].directory
    status, body = await agent.post("/unload_model", {"model_id": "org/tiny", "to": "NONE"})
    assert (status, body["cache_level"]) == (200, "NONE")
    assert not directory.exists()
    assert (await agent.heartbeat())["models"] == []


async def test_unload_refusals(agent, tiny_model):
    status, body = await agent.post("/unload_model", {"model_id": "nope", "to": "NONE"})
    assert (status, body["error"]["code"]) == (404, "model_not_found")

    load = asyncio.ensure_future(agent.post("/load_model", load_body(tiny_model)))
    await asyncio.sleep(0.01)
    status, body = await agent.post("/unload_model", {"model_id": "org/tiny", "to": "NVME_CACHED"})
    assert (status, body["error"]["code"]) == (409, "load_in_progress")
    await load

    agent.server.registry.slots["org/tiny"].in_flight = 1
    status, body = await agent.post("/unload_model", {"model_id": "org/tiny", "to": "NVME_CACHED"})
    assert (status, body["error"]["code"]) == (409, "requests_in_flight")
    status, _ = await agent.post(
        "/unload_model", {"model_id": "org/tiny", "to": "NVME_CACHED", "force": True}
    )
    assert status == 200


async def test_an_unload_with_drain_seconds_waits_for_the_requests_in_flight(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    slot = agent.server.registry.slots["org/tiny"]
    url = f"{agent.url}/models/org/tiny/v1/completions"
    body = {"model": "org/tiny", "prompt": "hi", "max_tokens": 600}  # about 0.6 s

    async def complete() -> int:
        async with agent.http.post(url, json=body, headers=agent.headers) as response:
            await response.read()
            return response.status

    request = asyncio.ensure_future(complete())
    await until(lambda: slot.in_flight == 1, 5, "the request in flight")
    unload = {"model_id": "org/tiny", "to": "NVME_CACHED", "drain_seconds": 10}
    status, answer = await agent.post("/unload_model", unload)
    assert status == 200, answer
    assert request.done()  # it waited for the request, and cut nothing
    assert await request == 200

    await agent.post("/load_model", load_body(tiny_model))
    agent.server.registry.slots["org/tiny"].in_flight = 1  # never ends
    status, answer = await agent.post("/unload_model", {**unload, "drain_seconds": 0.3})
    assert (status, answer["error"]["code"]) == (409, "requests_in_flight")  # past its drain
    status, _ = await agent.post("/unload_model", {**unload, "drain_seconds": -1})
    assert status == 400


async def test_a_source_that_does_not_exist_fails_the_load(agent, tmp_path):
    status, body = await agent.post(
        "/load_model", {"model_id": "m", "source": (tmp_path / "missing").as_uri()}
    )
    assert (status, body["status"], body["model_id"]) == (404, "error", "m")
    assert body["error"]["code"] == "model_not_found"
    assert agent.model(await agent.heartbeat(), "m")["cache_state"] == "FAILED"


async def test_azure_sources_need_credentials(agent):
    status, body = await agent.post("/load_model", {"model_id": "m", "source": "azure://models/m"})
    assert (status, body["error"]["code"]) == (400, "no_credentials")
    assert "AZURE_STORAGE_CONNECTION_STRING" in body["error"]["message"]


async def test_an_engine_that_dies_is_failed_in_the_next_heartbeat(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    engine = agent.server.registry.slots["org/tiny"].engine
    assert isinstance(engine, SimEngine)
    await engine.crash()
    await asyncio.sleep(0.05)
    model = agent.model(await agent.heartbeat(), "org/tiny")
    assert (model["cache_state"], model["cache_level"]) == ("FAILED", "NVME_CACHED")
    assert "engine died" in model["error"]
    # A new load starts a fresh engine: a restart.
    status, _ = await agent.post("/load_model", load_body(tiny_model))
    assert status == 200
    assert agent.server.metrics.engine_restarts.labels("sim")._value.get() == 1


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


async def test_a_restarted_agent_finds_its_cached_models(tmp_path, tiny_model):
    server, test_server, url = await start_agent(sim_args(tmp_path / "cache"))
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        await http.post(f"{url}/load_model", json=load_body(tiny_model))
    await test_server.close()
    assert server.registry.slots["org/tiny"].engine is None  # shutdown stopped it

    again, test_server, url = await start_agent(sim_args(tmp_path / "cache"))
    try:
        slot = again.registry.slots["org/tiny"]
        assert (slot.state, slot.cache_level, slot.source) == (
            "UNLOADED",
            "NVME_CACHED",
            tiny_model.as_uri(),
        )
        assert [cached.model_id for cached in ModelCache(tmp_path / "cache" / "models").scan()] == [
            "org/tiny"
        ]
    finally:
        await test_server.close()


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


async def test_registration_retries_with_backoff_until_the_control_plane_answers(tmp_path) -> None:
    calls: list[dict] = []

    async def register(request: web.Request) -> web.Response:
        calls.append({"auth": request.headers.get("Authorization"), "body": await request.json()})
        if len(calls) < 3:
            return web.json_response({"detail": "starting"}, status=503)
        return web.json_response({"agent_id": "test-agent", "created": True}, status=201)

    control_plane = web.Application()
    control_plane.router.add_post("/api/agents/register", register)
    async with TestServer(control_plane) as cp:
        server, test_server, _ = await start_agent(
            sim_args(tmp_path / "cache", "--control-plane-url", str(cp.make_url("")).rstrip("/"))
        )
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
        finally:
            await test_server.close()
    assert len(calls) == 3
    assert calls[-1]["auth"] == f"Bearer {TOKEN}"
    assert calls[-1]["body"]["agent_id"] == "test-agent"
    assert calls[-1]["body"]["gpus"] == []


async def test_an_engine_interpreter_that_does_not_exist_fails_the_load(tmp_path, tiny_model):
    server, test_server, url = await start_agent(
        sim_args(tmp_path / "cache", "--engine-python", str(tmp_path / "no-such-python"))
    )
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            body = load_body(tiny_model, engine={"name": "vllm"})
            async with http.post(f"{url}/load_model", json=body) as response:
                assert response.status == 502
                error = (await response.json())["error"]
        assert error["code"] == "engine_start_failed"
        assert "no-such-python" in error["message"]
        assert server.registry.slots["org/tiny"].state == "FAILED"
    finally:
        await test_server.close()


async def test_an_unexpected_failure_is_a_500_that_names_it_and_leaves_the_model_failed(
    agent, tiny_model, monkeypatch
):
    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("nodeagent.download_write._preallocate", disk_full)
    status, body = await agent.post("/load_model", load_body(tiny_model))
    assert (status, body["error"]["code"]) == (500, "load_failed")
    assert "No space left on device" in body["error"]["message"]
    assert agent.model(await agent.heartbeat(), "org/tiny")["cache_state"] == "FAILED"
    assert agent.server.registry.cache.scan() == []  # no half-written model


async def test_a_load_past_its_deadline_fails_with_504(tmp_path, tiny_model):
    args = sim_args(tmp_path / "cache", "--sim-load-seconds", "5", "--load-timeout", "0.2")
    server, test_server, url = await start_agent(args)
    try:
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            http.post(f"{url}/load_model", json=load_body(tiny_model)) as response,
        ):
            assert response.status == 504
            assert (await response.json())["error"]["code"] == "load_timeout"
        assert server.registry.slots["org/tiny"].state == "FAILED"
    finally:
        await test_server.close()


async def test_an_engine_that_cannot_sleep_steps_down_to_nvme_and_says_so(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model))
    engine = agent.server.registry.slots["org/tiny"].engine
    engine.supports_sleep = False  # as vLLM on a host without a CUDA GPU
    status, body = await agent.post("/unload_model", {"model_id": "org/tiny", "to": "DRAM_CACHED"})
    assert (status, body["cache_state"], body["cache_level"]) == (200, "UNLOADED", "NVME_CACHED")
    assert body["note"] == "the sim engine cannot sleep on this host; stepped down to NVME_CACHED"
    assert agent.server.registry.slots["org/tiny"].engine is None
    assert not engine.server.sleeping


async def test_cache_eviction_makes_room_but_keeps_the_running_model(tmp_path, tiny_model):
    # The tiny checkpoint is 1.9 MB: two fit in 5 MB, three do not.
    server, test_server, url = await start_agent(
        sim_args(tmp_path / "cache", "--cache-max-bytes", "5M")
    )
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http:

            async def call(path: str, body: dict) -> tuple[int, dict]:
                async with http.post(f"{url}{path}", json=body) as response:
                    return response.status, await response.json()

            assert (await call("/load_model", load_body(tiny_model, "running")))[0] == 200
            assert (await call("/load_model", load_body(tiny_model, "idle")))[0] == 200
            await call("/unload_model", {"model_id": "idle", "to": "NVME_CACHED"})

            status, _ = await call("/load_model", load_body(tiny_model, "new"))
            assert status == 200
            cached = {entry.model_id for entry in server.registry.cache.scan()}
            assert cached == {"running", "new"}  # the idle one went; the running one stayed
            assert "idle" not in server.registry.slots

            status, body = await call("/load_model", load_body(tiny_model, "one-too-many"))
            assert (status, body["error"]["code"]) == (507, "cache_full")
            assert {entry.model_id for entry in server.registry.cache.scan()} == {"running", "new"}
    finally:
        await test_server.close()


async def test_a_new_revision_replaces_a_sleeping_engine_instead_of_waking_it(agent, tiny_model):
    await agent.post("/load_model", load_body(tiny_model, revision="v1"))
    old_engine = agent.server.registry.slots["org/tiny"].engine
    await agent.post("/unload_model", {"model_id": "org/tiny", "to": "DRAM_CACHED"})

    status, body = await agent.post("/load_model", load_body(tiny_model, revision="v2"))
    assert status == 200
    assert body["timings"]["wake_seconds"] is None
    assert body["timings"]["files_cached"] is False  # another revision: fetched again
    assert agent.server.registry.slots["org/tiny"].engine is not old_engine
    assert agent.server.registry.slots["org/tiny"].revision == "v2"
    assert starts(agent) == 2


ISSUED = "lfa_" + "a" * 64
ROTATED = "lfa_" + "b" * 64


async def test_an_agent_enrols_keeps_its_credential_and_takes_no_other_token(tmp_path) -> None:
    calls: list[str | None] = []

    async def register(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Authorization"))
        if calls[-1] == f"Bearer {TOKEN}":
            body = {"agent_id": "test-agent", "created": True, "credential": ISSUED}
            return web.json_response(body, status=201)
        return web.json_response({"agent_id": "test-agent", "created": False}, status=200)

    async def confirm(request: web.Request) -> web.Response:
        # The control plane issues ROTATED, and only that one.
        return web.Response(status=204 if request.headers["Authorization"] == f"Bearer {ROTATED}"
                            else 403)  # fmt: skip

    control_plane = web.Application()
    control_plane.router.add_post("/api/agents/register", register)
    control_plane.router.add_post("/api/agents/test-agent/credential/confirm", confirm)
    cache = tmp_path / "cache"
    async with TestServer(control_plane) as cp, aiohttp.ClientSession() as http:
        cp_url = str(cp.make_url("")).rstrip("/")
        server, test_server, url = await start_agent(sim_args(cache, "--control-plane-url", cp_url))
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
            kept = cache / "agent-credential"
            assert kept.read_text().strip() == ISSUED
            assert kept.stat().st_mode & 0o777 == 0o600

            async def status_with(token: str, path: str = "/heartbeat") -> int:
                headers = {"Authorization": f"Bearer {token}"}
                async with http.post(f"{url}{path}", headers=headers) as response:
                    return response.status

            # The enrolment token every agent holds calls no agent once it has a control plane.
            assert await status_with(TOKEN) == 401
            assert await status_with(ISSUED) == 200
            # Whoever holds ISSUED (leaked, say) cannot rotate the agent to a credential of its
            # own: the control plane does not confirm it, and the agent keeps what it had.
            attackers = "lfa_" + "e" * 64
            async with http.post(
                f"{url}/credential", json={"credential": attackers},
                headers={"Authorization": f"Bearer {ISSUED}"},
            ) as response:  # fmt: skip
                assert response.status == 403
                assert (await response.json())["error"]["code"] == "credential_unconfirmed"
            assert kept.read_text().strip() == ISSUED
            assert await status_with(attackers) == 401
            async with http.post(
                f"{url}/credential", json={"credential": ROTATED},
                headers={"Authorization": f"Bearer {ISSUED}"},
            ) as response:  # fmt: skip
                assert response.status == 200
            assert kept.read_text().strip() == ROTATED
            # The previous one still works for calls already under way; a third never did.
            assert (await status_with(ROTATED), await status_with(ISSUED)) == (200, 200)
            assert await status_with("lfa_" + "c" * 64) == 401
        finally:
            await test_server.close()

        # Restarted: it registers with the kept credential, not the enrolment token.
        server, test_server, _ = await start_agent(sim_args(cache, "--control-plane-url", cp_url))
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
        finally:
            await test_server.close()
    assert calls == [f"Bearer {TOKEN}", f"Bearer {ROTATED}"]


async def test_an_agent_whose_credential_the_control_plane_forgot_enrols_again(tmp_path):
    calls: list[str | None] = []

    async def register(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Authorization"))
        if calls[-1] == f"Bearer {ISSUED}":
            return web.json_response({"detail": "Unknown or revoked agent credential"}, status=401)
        body = {"agent_id": "test-agent", "created": True, "credential": ROTATED}
        return web.json_response(body, status=201)

    control_plane = web.Application()
    control_plane.router.add_post("/api/agents/register", register)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "agent-credential").write_text(ISSUED)
    async with TestServer(control_plane) as cp:
        cp_url = str(cp.make_url("")).rstrip("/")
        server, test_server, _ = await start_agent(sim_args(cache, "--control-plane-url", cp_url))
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
        finally:
            await test_server.close()
    assert calls == [f"Bearer {ISSUED}", f"Bearer {TOKEN}"]
    assert (cache / "agent-credential").read_text().strip() == ROTATED


def test_a_rotation_whose_answer_was_lost_can_be_sent_again_with_the_old_credential(tmp_path):
    from nodeagent.credential import Credentials

    kept = Credentials(tmp_path / "credential", TOKEN, standalone=False)
    kept.store(ISSUED)
    kept.store(ROTATED)  # the control plane never heard that it took this one
    assert kept.accepts(ISSUED)
    assert kept.may_rotate(ISSUED)  # so the control plane, still on ISSUED, can try again
    assert kept.accepts(ROTATED)  # the new one presented: the old one's grace starts
    assert not kept.may_rotate(ISSUED)  # from now on only the current one rotates
    assert kept.accepts(ISSUED)  # calls already under way still finish
    kept.forget()
    assert not kept.accepts(ROTATED)
    assert not kept.accepts(ISSUED)


async def test_an_agent_forgets_its_credential_only_when_its_control_plane_revoked_it(tmp_path):
    """Whoever holds the credential (one that leaked) could otherwise lock the agent out."""
    revoked: list[bool] = [False]

    async def register(request: web.Request) -> web.Response:
        return web.json_response({"agent_id": "test-agent", "created": False}, status=200)

    async def confirm(request: web.Request) -> web.Response:
        asked = await request.json()
        ok = asked == {"revocation": True} and revoked[0]
        ok = ok and request.headers["Authorization"] == f"Bearer {ISSUED}"
        return web.Response(status=204 if ok else 403)

    control_plane = web.Application()
    control_plane.router.add_post("/api/agents/register", register)
    control_plane.router.add_post("/api/agents/test-agent/credential/confirm", confirm)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "agent-credential").write_text(ISSUED)
    async with TestServer(control_plane) as cp, aiohttp.ClientSession() as http:
        cp_url = str(cp.make_url("")).rstrip("/")
        server, test_server, url = await start_agent(sim_args(cache, "--control-plane-url", cp_url))
        headers = {"Authorization": f"Bearer {ISSUED}"}
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
            async with http.delete(f"{url}/credential", headers=headers) as response:
                assert response.status == 403
                assert (await response.json())["error"]["code"] == "credential_unconfirmed"
            assert (cache / "agent-credential").read_text().strip() == ISSUED
            revoked[0] = True  # the control plane revoked it
            async with http.delete(f"{url}/credential", headers=headers) as response:
                assert response.status == 200
            assert not (cache / "agent-credential").exists()
        finally:
            await test_server.close()
