"""Loads and unloads through the agent: each cache level a model steps through, the engines
it starts, wakes and stops, its disk cache, and how a load fails."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from nodeagent.cache import ModelCache
from nodeagent.engines.sim import SimEngine
from nodeagent.protocol import HeartbeatResponse
from tests.nodeagent.conftest import TOKEN, load_body, sim_args, start_agent, starts
from tests.support import until


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
        "compile_cache_seconds": None, "failed_sources": [],
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
