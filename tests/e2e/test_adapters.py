"""LoRA adapters as catalog models, for real: daphne, a Celery worker and beat, node agents
with sim engines (real vLLM in test_adapters_vllm.py), the openai client."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import openai
import pytest

from agents import actions
from agents.choices import CacheLevel, LoadEventKind, PlacementState
from agents.models import LoadEvent, Model, Placement
from controlplane.gateway.models import Usage
from nodeagent import tinymodel
from nodeagent.engines.simanswers import words_for
from nodeagent.store.publish import publish
from tests.e2e.agent_process import AgentProcess
from tests.e2e.fleet import registered, running_control_plane
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SIM = ["--engine", "sim", "--sim-load-seconds", "0.5", "--sim-ttft-ms", "1", "--sim-tpot-ms", "1"]
HELLO: Any = [{"role": "user", "content": "hello there"}]
LOADED = 'llmfleet_agent_adapter_loads_total{outcome="loaded"}'


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """The tiny checkpoint and four rank-8 adapters of it, published to file:// stores."""
    root = tmp_path_factory.mktemp("published")
    sources = {"base": tinymodel.build(root / "tiny").as_uri()}
    for index, name in enumerate("abcd"):
        built = tinymodel.build_adapter(root / "built" / name, seed=index + 1)
        target = root / "store" / name
        publish(built, target.as_uri(), {}, stream=io.StringIO())
        sources[name] = target.as_uri()
    return sources


@pytest.fixture
def fleet(settings, tmp_path):
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        yield plane, stack


def one_agent(fleet, tmp_path) -> AgentProcess:
    """gpu-a, a sim agent, once it has registered."""
    plane, stack = fleet
    agent = plane.agent(stack, tmp_path, "gpu-a", *SIM)
    registered("gpu-a")
    return agent


def catalog(published, *names: str, max_loras: int = 4, **options) -> dict[str, Model]:
    base, _ = actions.register_catalog_model(
        "org/tiny", published["base"], size_bytes=1, max_loras=max_loras
    )
    models = {"base": base}
    for name in names:
        models[name], _ = actions.register_catalog_model(
            f"org/tiny-{name}", published[name], size_bytes=1, base="org/tiny", adapter_rank=8,
            **options,
        )  # fmt: skip
    return models


def client_for(url: str, *model_ids: str) -> openai.OpenAI:
    _, raw_key = make_api_key("adapters", model_ids)
    return openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str) -> str:
    answer = client.chat.completions.create(model=model, messages=HELLO, max_tokens=5)
    assert answer.model == model
    return answer.choices[0].message.content or ""


def said_by(model: str) -> str:
    """What the sim engine answers HELLO with: an adapter's words are its own."""
    return " ".join(words_for(f"{model}\nhello there" if "-" in model else "hello there", 5))


def base_loads() -> list[LoadEvent]:
    return list(LoadEvent.objects.filter(kind=LoadEventKind.LOAD).order_by("queued_at"))


def held(agent_id: str = "gpu-a") -> set[str]:
    placement = Placement.objects.get(agent__agent_id=agent_id, model__model_id="org/tiny")
    return set(placement.adapters)


def test_an_adapter_is_served_by_its_warm_base_streaming_and_not(fleet, tmp_path, published):
    plane, _ = fleet
    agent = one_agent(fleet, tmp_path)
    catalog(published, "a")
    client = client_for(plane.url)
    assert ask(client, "org/tiny") == said_by("org/tiny")  # the base, cold, with LoRA on
    assert ask(client, "org/tiny-a") == said_by("org/tiny-a")
    stream = client.chat.completions.create(
        model="org/tiny-a", messages=HELLO, max_tokens=5, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == said_by("org/tiny-a")
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 5
    # One engine, one adapter load: the adapter never started an engine of its own.
    assert len(base_loads()) == 1
    assert agent.metric(LOADED) == 1
    placement = Placement.objects.get(model__model_id="org/tiny")
    assert (placement.max_loras, placement.max_lora_rank) == (4, 8)
    wait_for(lambda: held() == {"org/tiny-a"}, 10, "the heartbeat to report the adapter")
    listed = {m.id: m for m in client.models.list().data}
    assert listed["org/tiny-a"].model_extra["parent"] == "org/tiny"
    assert listed["org/tiny"].model_extra["parent"] is None


def test_an_adapter_request_cold_starts_its_base_and_concurrent_ones_load_it_once(
    fleet, tmp_path, published
):
    plane, _ = fleet
    agent = one_agent(fleet, tmp_path)
    catalog(published, "a")
    client = client_for(plane.url)
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: ask(client, "org/tiny-a"), range(8)))
    assert answers == [said_by("org/tiny-a")] * 8
    assert [load.model.model_id for load in base_loads()] == ["org/tiny"]
    assert agent.metric(LOADED) == 1


def test_keys_allow_adapters_and_usage_is_counted_per_adapter(fleet, tmp_path, published):
    plane, _ = fleet
    one_agent(fleet, tmp_path)
    catalog(published, "a", "b")
    client = client_for(plane.url, "org/tiny-a")  # the adapter alone, not its base
    assert ask(client, "org/tiny-a") == said_by("org/tiny-a")
    for model in ("org/tiny", "org/tiny-b"):
        with pytest.raises(openai.PermissionDeniedError):
            ask(client, model)
    wait_for(lambda: Usage.objects.filter(model_id="org/tiny-a").exists(), 10, "the usage record")
    usage = Usage.objects.get()
    assert (usage.model_id, usage.requests, usage.completion_tokens) == ("org/tiny-a", 1, 5)


def test_the_least_recently_used_adapter_makes_room_in_one_engine(fleet, tmp_path, published):
    plane, _ = fleet
    agent = one_agent(fleet, tmp_path)
    catalog(published, "a", "b", "c", "d", max_loras=2)
    client = client_for(plane.url)
    for name in "abcdab":
        assert ask(client, f"org/tiny-{name}") == said_by(f"org/tiny-{name}")
    assert len(base_loads()) == 1
    assert agent.metric(LOADED) == 6
    assert agent.metric('llmfleet_agent_adapter_unloads_total{reason="lru"}') == 4
    wait_for(lambda: held() == {"org/tiny-a", "org/tiny-b"}, 10, "the heartbeat's adapters")


def test_idle_adapters_unload_and_their_base_stays(fleet, tmp_path, published):
    plane, _ = fleet
    agent = one_agent(fleet, tmp_path)
    catalog(published, "a", keep_alive=timedelta(seconds=1))
    client = client_for(plane.url)
    assert ask(client, "org/tiny-a") == said_by("org/tiny-a")
    wait_for(
        lambda: agent.metric('llmfleet_agent_adapter_unloads_total{reason="request"}') == 1,
        30,
        "the sweep to unload the idle adapter",
    )
    wait_for(lambda: held() == set(), 10, "the placement to forget it")
    base = Placement.objects.get(model__model_id="org/tiny")
    assert (base.state, base.cache_level) == (PlacementState.READY, CacheLevel.GPU_RESIDENT)
    assert ask(client, "org/tiny-a") == said_by("org/tiny-a")  # and back, in milliseconds
    assert agent.metric(LOADED) == 2


def test_heartbeats_reconcile_an_engine_that_lost_an_adapter(fleet, tmp_path, published):
    plane, _ = fleet
    agent = one_agent(fleet, tmp_path)
    catalog(published, "a")
    client = client_for(plane.url)
    assert ask(client, "org/tiny-a") == said_by("org/tiny-a")
    wait_for(lambda: held() == {"org/tiny-a"}, 10, "the heartbeat's adapters")
    # Behind the control plane's back (an operator on the host): the engine drops it.
    dropped = agent.post("/unload_adapter", {"model_id": "org/tiny", "adapter_id": "org/tiny-a"})
    assert dropped.status_code == 200, dropped.text
    wait_for(lambda: held() == set(), 10, "a heartbeat to say it is gone")
    assert ask(client, "org/tiny-a") == said_by("org/tiny-a")
    assert agent.metric(LOADED) == 2
    wait_for(lambda: held() == {"org/tiny-a"}, 10, "the heartbeat's adapters")


def test_an_agent_that_lost_its_adapters_is_reconciled_and_serves_them_again(
    fleet, tmp_path, published
):
    plane, stack = fleet
    catalog(published, "a")
    client = client_for(plane.url)
    with ExitStack() as first:
        plane.agent(first, tmp_path, "gpu-a", *SIM)
        registered("gpu-a")
        assert ask(client, "org/tiny-a") == said_by("org/tiny-a")
        wait_for(lambda: held() == {"org/tiny-a"}, 10, "the heartbeat's adapters")
    # The agent stopped and its engines with it; started again, it holds no adapter.
    agent = plane.agent(stack, tmp_path, "gpu-a", *SIM)
    wait_for(
        lambda: (
            Placement.objects.get(model__model_id="org/tiny").cache_level == CacheLevel.NVME_CACHED
        ),
        20,
        "the restarted agent's heartbeat",
    )
    assert held() == set()
    assert ask(client, "org/tiny-a") == said_by("org/tiny-a")
    assert agent.metric(LOADED) == 1  # loaded into the new engine, from the agent's cache
    assert len(base_loads()) == 2


def test_a_base_running_without_lora_refuses_its_adapters_clearly(fleet, tmp_path, published):
    plane, _ = fleet
    one_agent(fleet, tmp_path)
    catalog(published)  # no adapter yet: the base starts without LoRA
    client = client_for(plane.url)
    assert ask(client, "org/tiny")
    catalog(published, "a")
    with pytest.raises(openai.InternalServerError) as raised:
        ask(client, "org/tiny-a")
    assert raised.value.status_code == 503
    assert "runs without LoRA" in str(raised.value)
