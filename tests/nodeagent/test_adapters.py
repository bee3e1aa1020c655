"""LoRA adapters in an agent's engines (nodeagent.adapters), with the sim engine."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path

import pytest
from yarl import URL

from nodeagent import tinymodel
from nodeagent.engines.sim import SimEngine
from nodeagent.engines.simanswers import words_for
from nodeagent.engines.simserver import SimServer
from nodeagent.protocol import AdapterRef, HeartbeatResponse
from nodeagent.store.publish import publish
from tests.nodeagent.conftest import RunningAgent
from tests.support import until

LORA = ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Three published rank-8 adapters and one of rank 16."""
    root = tmp_path_factory.mktemp("adapters")
    published = {}
    for name, rank, seed in (("a", 8, 1), ("b", 8, 2), ("c", 8, 3), ("wide", 16, 4)):
        built = tinymodel.build_adapter(root / "built" / name, rank=rank, seed=seed)
        publish(built, (root / "store" / name).as_uri(), {}, stream=io.StringIO())
        published[name] = root / "store" / name
    return published


def ref(adapters: dict[str, Path], name: str) -> AdapterRef:
    return AdapterRef(f"org/tiny-{name}", adapters[name].as_uri())


async def load_base(agent: RunningAgent, tiny_model: Path, args: list[str] = LORA) -> None:
    status, body = await agent.post(
        "/load_model",
        {"model_id": "org/tiny", "source": tiny_model.as_uri(), "engine": {"args": args}},
    )
    assert status == 200, body
    assert (body["max_loras"], body["max_lora_rank"]) == ((2, 8) if args else (0, 0))
    assert body["max_num_seqs"] == 8  # the sim's --sim-max-num-seqs: the gateway's seats


async def ask(
    agent: RunningAgent, adapter: AdapterRef | None, prompt: str = "hi"
) -> tuple[int, dict]:
    body = {
        "model": adapter.adapter_id if adapter else "org/tiny",
        "prompt": prompt,
        "max_tokens": 3,
    }
    headers = {**agent.headers, **(adapter.headers() if adapter else {})}
    async with agent.http.post(
        f"{agent.url}/models/org/tiny/v1/completions", json=body, headers=headers
    ) as response:
        return response.status, await response.json()


def sim(agent: RunningAgent) -> SimServer:
    engine = agent.server.registry.slots["org/tiny"].engine
    assert isinstance(engine, SimEngine)
    return engine.server


def held(heartbeat: dict) -> dict[str, dict]:
    model = next(m for m in heartbeat["models"] if m["model_id"] == "org/tiny")
    return {adapter["adapter_id"]: adapter for adapter in model["adapters"]}


async def test_an_adapter_loads_on_its_first_request_and_answers_as_itself(
    agent, tiny_model, adapters
):
    await load_base(agent, tiny_model)
    a = ref(adapters, "a")
    status, body = await ask(agent, a)
    assert status == 200, body
    assert body["model"] == "org/tiny-a"
    assert body["choices"][0]["text"] == " ".join(words_for("org/tiny-a\nhi", 3))
    _, base = await ask(agent, None)
    assert base["choices"][0]["text"] == " ".join(words_for("hi", 3))  # the base is unchanged
    assert (await ask(agent, a))[0] == 200

    heartbeat = await agent.heartbeat()
    HeartbeatResponse.from_json(heartbeat)
    model = agent.model(heartbeat, "org/tiny")
    assert (model["max_loras"], model["max_lora_rank"], model["max_num_seqs"]) == (2, 8, 8)
    assert held(heartbeat)["org/tiny-a"]["requests_total"] == 2
    assert held(heartbeat)["org/tiny-a"]["requests_in_flight"] == 0
    # An adapter's files are cached beside the models, but it is no model of the agent's.
    assert [m["model_id"] for m in heartbeat["models"]] == ["org/tiny"]
    assert sim(agent).lora_loads == 1
    metrics = agent.server.metrics
    assert metrics.adapter_loads.labels("loaded")._value.get() == 1


async def test_concurrent_first_requests_for_an_adapter_load_it_once(agent, tiny_model, adapters):
    await load_base(agent, tiny_model)
    answers = await asyncio.gather(*(ask(agent, ref(adapters, "a")) for _ in range(8)))
    assert {status for status, _ in answers} == {200}
    assert sim(agent).lora_loads == 1


async def test_the_least_recently_used_idle_adapter_makes_room(agent, tiny_model, adapters):
    await load_base(agent, tiny_model)
    for name in ("a", "b", "a", "c"):  # max_loras 2: c needs a slot, and b is older than a
        assert (await ask(agent, ref(adapters, name)))[0] == 200
    assert set(held(await agent.heartbeat())) == {"org/tiny-a", "org/tiny-c"}
    assert set(sim(agent).loras) == {"org/tiny-a", "org/tiny-c"}
    assert agent.server.metrics.adapter_unloads.labels("lru")._value.get() == 1
    assert (await ask(agent, ref(adapters, "b")))[0] == 200  # and back, in a's place
    assert set(sim(agent).loras) == {"org/tiny-b", "org/tiny-c"}


async def test_an_adapter_keeps_serving_while_another_loads_and_busy_slots_refuse(
    agent, tiny_model, adapters
):
    await load_base(agent, tiny_model)
    registry = agent.server.registry
    a = await registry.acquire_adapter("org/tiny", ref(adapters, "a"), agent.http)
    b = await registry.acquire_adapter("org/tiny", ref(adapters, "b"), agent.http)
    # Both slots serve a request: a third adapter waits for no one.
    status, body = await ask(agent, ref(adapters, "c"))
    assert (status, body["error"]["code"]) == (503, "adapters_busy")
    assert set(sim(agent).loras) == {"org/tiny-a", "org/tiny-b"}
    assert (await ask(agent, ref(adapters, "a")))[0] == 200  # held ones still answer
    registry.release_adapter(b)
    assert (await ask(agent, ref(adapters, "c")))[0] == 200  # b was idle: it made room
    assert set(sim(agent).loras) == {"org/tiny-a", "org/tiny-c"}
    registry.release_adapter(a)


async def test_adapters_an_engine_cannot_take_are_refused_and_nothing_is_half_loaded(
    agent, tiny_model, adapters
):
    await load_base(agent, tiny_model)
    status, body = await ask(agent, ref(adapters, "wide"))
    assert (status, body["error"]["code"]) == (422, "adapter_rank_too_high")
    assert "rank 16" in body["error"]["message"]
    assert sim(agent).loras == {}
    assert held(await agent.heartbeat()) == {}


async def test_an_engine_started_without_lora_refuses_adapters(agent, tiny_model, adapters):
    await load_base(agent, tiny_model, args=[])
    status, body = await ask(agent, ref(adapters, "a"))
    assert (status, body["error"]["code"]) == (409, "lora_disabled")


async def test_an_adapter_that_fails_verification_is_refused_and_not_loaded(
    agent, tiny_model, adapters, tmp_path
):
    await load_base(agent, tiny_model)
    corrupt = tmp_path / "corrupt"
    publish(adapters["a"], corrupt.as_uri(), {}, stream=io.StringIO())
    weights = corrupt / "adapter_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF  # same size: only the digest can tell
    weights.write_bytes(bytes(data))
    status, body = await ask(agent, AdapterRef("org/tiny-bad", corrupt.as_uri()))
    assert (status, body["error"]["code"]) == (502, "adapter_checksum_mismatch"), body
    assert sim(agent).loras == {}
    assert agent.server.metrics.adapter_loads.labels("failed")._value.get() == 1


async def test_unload_adapter_and_a_restarted_engine_holds_none(agent, tiny_model, adapters):
    await load_base(agent, tiny_model)
    assert (await ask(agent, ref(adapters, "a")))[0] == 200
    status, body = await agent.post(
        "/unload_adapter", {"model_id": "org/tiny", "adapter_id": "org/tiny-a"}
    )
    assert status == 200, body
    assert sim(agent).loras == {}
    status, body = await agent.post(
        "/unload_adapter", {"model_id": "org/tiny", "adapter_id": "org/tiny-a"}
    )
    assert (status, body["error"]["code"]) == (404, "adapter_not_found")

    status, body = await agent.post(
        "/load_adapter",
        {"model_id": "org/tiny", "adapter_id": "org/tiny-b", "source": adapters["b"].as_uri()},
    )
    assert status == 200, body
    assert body["adapter"]["adapter_id"] == "org/tiny-b"
    engine = agent.server.registry.slots["org/tiny"].engine
    assert isinstance(engine, SimEngine)
    await engine.crash()  # the engine dies: its adapters go with it
    slot = agent.server.registry.slots["org/tiny"]
    await until(lambda: slot.engine is None, 5, "the watcher to notice")
    await load_base(agent, tiny_model)
    assert held(await agent.heartbeat()) == {}
    assert (await ask(agent, ref(adapters, "b")))[0] == 200  # loaded again, from the cache
    assert sim(agent).lora_loads == 1


@pytest.mark.parametrize(
    "path",
    [
        "v1/load_lora_adapter",
        "v1/./load_lora_adapter",
        "v1//load_lora_adapter",
        "v1/x/../load_lora_adapter",
        "v1/%2E/load_lora_adapter",
        "v1/unload_lora_adapter/",
        "v1/../sleep",  # the engine's own endpoints outside /v1 are not the proxy's either
        "v1/%2E%2E/sleep",
        "v1/%252e%252e/sleep",  # decoded once here, and once more on the way to the engine
        "v1/load%255Flora%255Fadapter",
        "v1/..%5Csleep",
    ],
)
async def test_callers_cannot_reach_the_engines_own_adapter_endpoints(agent, tiny_model, path):
    await load_base(agent, tiny_model)
    # encoded=True: sent as written, not normalised by the client on the way out.
    url = URL(f"{agent.url}/models/org/tiny/{path}", encoded=True)
    async with agent.http.post(
        url, json={"lora_name": "x", "lora_path": "/etc"}, headers=agent.headers
    ) as response:
        assert response.status == 404
    assert sim(agent).loras == {}
    assert not sim(agent).sleeping


async def test_a_restarted_agent_knows_its_cached_adapters_apart_from_models(
    agent, tiny_model, adapters
):
    await load_base(agent, tiny_model)
    assert (await ask(agent, ref(adapters, "a")))[0] == 200
    registry = agent.server.registry
    registry.slots.clear()
    registry.adapter_files.clear()
    registry.restore()
    assert set(registry.slots) == {"org/tiny"}
    assert set(registry.adapter_files) == {"org/tiny-a"}


async def test_a_new_revision_replaces_the_old_once_it_is_idle(agent, tiny_model, adapters):
    await load_base(agent, tiny_model)
    old = ref(adapters, "a")
    new = AdapterRef(old.adapter_id, adapters["b"].as_uri(), "2")
    registry = agent.server.registry
    serving = await registry.acquire_adapter("org/tiny", old, agent.http)
    status, body = await ask(agent, new)  # the old one serves a request: not now
    assert (status, body["error"]["code"]) == (503, "adapters_busy")
    registry.release_adapter(serving)
    assert (await ask(agent, new))[0] == 200
    assert sim(agent).loras == {"org/tiny-a": str(registry.adapter_files["org/tiny-a"].directory)}
    assert held(await agent.heartbeat())["org/tiny-a"]["requests_total"] == 1
    assert sim(agent).lora_loads == 2


async def test_an_adapter_going_out_gets_no_request(agent, tiny_model, adapters, monkeypatch):
    """While the engine unloads an adapter (to make room), a request for it waits for it to
    load again, or is refused as busy; it never reaches an engine that no longer holds it."""
    args = ["--enable-lora", "--max-loras", "1", "--max-lora-rank", "8"]
    status, body = await agent.post(
        "/load_model",
        {"model_id": "org/tiny", "source": tiny_model.as_uri(), "engine": {"args": args}},
    )
    assert status == 200, body
    assert (await ask(agent, ref(adapters, "a")))[0] == 200
    from nodeagent import adapters as module

    slow = module.unload_lora

    async def slow_unload(*args, **kwargs):  # the engine drops it at once, answers late
        await slow(*args, **kwargs)
        await asyncio.sleep(0.3)

    monkeypatch.setattr(module, "unload_lora", slow_unload)
    b = asyncio.create_task(ask(agent, ref(adapters, "b")))  # unloads a to make room
    await asyncio.sleep(0.1)
    status, body = await ask(agent, ref(adapters, "a"))
    assert (await b)[0] == 200
    assert status == 200 or body["error"]["code"] == "adapters_busy", body


async def test_load_adapter_counts_no_request_in_flight(agent, tiny_model, adapters):
    await load_base(agent, tiny_model)
    status, body = await agent.post(
        "/load_adapter",
        {"model_id": "org/tiny", "adapter_id": "org/tiny-a", "source": adapters["a"].as_uri()},
    )
    assert status == 200, body
    facts = held(await agent.heartbeat())["org/tiny-a"]
    assert (facts["requests_in_flight"], facts["requests_total"]) == (0, 0)


async def test_an_adapter_keeps_serving_while_another_loads(
    agent, tiny_model, adapters, monkeypatch
):
    await load_base(agent, tiny_model)
    assert (await ask(agent, ref(adapters, "a")))[0] == 200
    from nodeagent import adapters as module

    loading = asyncio.Event()
    real = module.load_lora

    async def slow_load(*args, **kwargs):
        loading.set()
        await asyncio.sleep(0.5)
        await real(*args, **kwargs)

    monkeypatch.setattr(module, "load_lora", slow_load)
    b = asyncio.create_task(ask(agent, ref(adapters, "b")))
    await asyncio.wait_for(loading.wait(), 5)
    answers = await asyncio.gather(*(ask(agent, ref(adapters, "a")) for _ in range(5)))
    assert {status for status, _ in answers} == {200}
    assert not b.done()  # all five answered while b was still loading
    assert (await b)[0] == 200
