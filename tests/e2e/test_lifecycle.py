"""The serverless lifecycle for real: daphne, a Celery worker and beat, PostgreSQL, Redis,
node agents (sim engines here; real vLLM in test_lifecycle_vllm.py), the openai client."""

from __future__ import annotations

import signal
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from datetime import timedelta
from typing import Any

import openai
import pytest
import requests

from agents import actions
from agents.choices import (
    AgentState,
    CacheLevel,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
    ModelKind,
    PlacementState,
)
from agents.models import Agent, LoadEvent, Model, Placement
from controlplane.gateway.models import Usage
from nodeagent import tinymodel
from nodeagent.engines.simanswers import words_for
from tests.e2e.fleet import registered, running_control_plane, serving_on
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SIM = ["--engine", "sim", "--sim-load-seconds", "0.5", "--sim-ttft-ms", "1", "--sim-tpot-ms", "1"]
HELLO: Any = [{"role": "user", "content": "hello there"}]


@pytest.fixture
def tiny(tmp_path_factory):
    return tinymodel.build(tmp_path_factory.mktemp("tiny") / "tiny").as_uri()


@pytest.fixture
def fleet(settings, tmp_path):
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        yield plane, stack


def catalog(model_id: str, source: str, **options) -> Model:
    model, _ = actions.register_catalog_model(model_id, source, size_bytes=1, **options)
    return model


def client_for(url: str) -> openai.OpenAI:
    _, raw_key = make_api_key("lifecycle")
    return openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0, timeout=120)


def ask(client: openai.OpenAI, model: str = "org/tiny", max_tokens: int = 5) -> str:
    answer = client.chat.completions.create(model=model, messages=HELLO, max_tokens=max_tokens)
    return answer.choices[0].message.content or ""


def stream_lines(url: str, body: dict[str, Any], raw_key: str) -> list[bytes]:
    """A streamed answer's non-empty lines (SSE comments, events, data), once it ended."""
    with requests.post(
        url, json=body, stream=True, timeout=60, headers={"Authorization": f"Bearer {raw_key}"}
    ) as response:
        assert response.status_code == 200
        return [line for line in response.iter_lines() if line]


def loads(model: str = "org/tiny") -> list[LoadEvent]:
    return list(
        LoadEvent.objects.filter(model__model_id=model, kind=LoadEventKind.LOAD)
        .select_related("agent")
        .order_by("queued_at")
    )


def test_concurrent_cold_requests_are_answered_after_one_load(fleet, tmp_path, tiny):
    plane, stack = fleet
    for name in ("gpu-a", "gpu-b"):
        plane.agent(stack, tmp_path, name, *SIM)
    registered("gpu-a", "gpu-b")
    catalog("org/tiny", tiny)
    client = client_for(plane.url)
    with ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: ask(client), range(20)))
    assert answers == [" ".join(words_for("hello there", 5))] * 20
    [load] = loads()
    assert load.outcome == LoadOutcome.SUCCEEDED
    assert load.trigger == LoadTrigger.REQUEST
    assert load.queue_seconds is not None
    assert load.engine_start_seconds is not None
    assert load.download_seconds is not None
    wait_for(lambda: loads()[0].first_token_seconds is not None, 10, "the first-token time")
    placement = Placement.objects.get(model__model_id="org/tiny")
    assert placement.state == PlacementState.READY
    assert placement.agent == load.agent


def test_a_cold_stream_shows_the_load_progress_then_the_answer(fleet, tmp_path, tiny):
    plane, stack = fleet
    plane.agent(stack, tmp_path, "gpu-a", *SIM[:2], "--sim-load-seconds", "2")
    registered("gpu-a")
    catalog("org/tiny", tiny)
    _, raw_key = make_api_key("stream")
    body = {"model": "org/tiny", "messages": HELLO, "max_tokens": 3, "stream": True}
    lines = stream_lines(f"{plane.url}/v1/chat/completions", body, raw_key)
    comments = [line for line in lines if line.startswith(b":")]
    data = [line for line in lines if line.startswith(b"data: ")]
    assert comments[0] == b": loading org/tiny"
    assert any(b"starting the engine" in line for line in comments)
    assert data[-1] == b"data: [DONE]"
    assert len(data) >= 4  # the role chunk, three words, [DONE]


def test_responses_and_embeddings_cold_start_their_models(fleet, tmp_path, tiny):
    plane, stack = fleet
    plane.agent(stack, tmp_path, "gpu-a", *SIM[:2], "--sim-load-seconds", "2")
    registered("gpu-a")
    catalog("org/tiny", tiny)
    catalog("org/tiny-embed", tiny, kind=ModelKind.EMBEDDING)
    _, raw_key = make_api_key("cold")
    body = {"model": "org/tiny", "input": "hello there", "max_output_tokens": 3, "stream": True}
    lines = stream_lines(f"{plane.url}/v1/responses", body, raw_key)
    comments = [line for line in lines if line.startswith(b":")]
    events = [
        line.removeprefix(b"event: ").decode() for line in lines if line.startswith(b"event: ")
    ]
    assert comments[0] == b": loading org/tiny"
    assert any(b"starting the engine" in line for line in comments)
    assert lines.index(comments[-1]) < lines.index(b"event: response.created")  # progress first
    assert events[0] == "response.created"
    assert events.count("response.output_text.delta") == 3
    assert events[-1] == "response.completed"

    client = openai.OpenAI(base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0, timeout=60)
    embedded = client.embeddings.create(model="org/tiny-embed", input=["a", "b"])
    assert len(embedded.data) == 2
    (load,) = loads("org/tiny-embed")
    assert load.outcome == LoadOutcome.SUCCEEDED
    # Its engine started as a pooling runner: the same checkpoint serves no completions there.
    placement = Placement.objects.select_related("agent").get(model__model_id="org/tiny-embed")
    direct = requests.post(
        f"{placement.inference_endpoint_url}/v1/completions", timeout=10,
        json={"model": "org/tiny-embed", "prompt": "hi"},
        headers={"Authorization": f"Bearer {placement.agent.credential}"},
    )  # fmt: skip
    assert direct.status_code == 404


def test_an_agent_killed_mid_stream_goes_offline_and_another_serves(fleet, tmp_path, tiny):
    plane, stack = fleet
    slow = [*SIM[:-1], "50"]  # 50 ms a token: the stream runs long enough to be cut
    first = plane.agent(stack, tmp_path, "gpu-a", *slow)
    registered("gpu-a")
    catalog("org/tiny", tiny)
    client = client_for(plane.url)
    assert ask(client)  # cold-started on gpu-a, the only agent
    plane.agent(stack, tmp_path, "gpu-b", *SIM)
    registered("gpu-b")
    stream = client.chat.completions.create(
        model="org/tiny", messages=HELLO, max_tokens=400, stream=True
    )
    received = []

    def read_and_kill_the_agent_at_the_fifth_chunk() -> None:
        for chunk in stream:
            received.append(chunk)
            if len(received) == 5:
                first.process.send_signal(signal.SIGKILL)

    with pytest.raises(openai.APIError, match="failed mid-stream"):
        read_and_kill_the_agent_at_the_fifth_chunk()
    assert len(received) >= 5
    wait_for(lambda: Agent.objects.get(agent_id="gpu-a").state == AgentState.OFFLINE, 20, "OFFLINE")
    assert ask(client) == " ".join(words_for("hello there", 5))
    assert [load.agent.agent_id for load in loads()] == ["gpu-a", "gpu-b"]


def test_a_load_that_fails_on_one_agent_succeeds_on_another(fleet, tmp_path, tiny):
    plane, stack = fleet
    # gpu-a's engine cannot start (its vLLM interpreter is /bin/false); the names make it
    # the first choice between two otherwise equal agents.
    plane.agent(stack, tmp_path, "gpu-a", "--engine", "vllm", "--engine-python", "/bin/false")
    plane.agent(stack, tmp_path, "gpu-b", *SIM)
    registered("gpu-a", "gpu-b")
    catalog("org/tiny", tiny)
    assert ask(client_for(plane.url)) == " ".join(words_for("hello there", 5))
    failed, retried = loads()
    assert (failed.agent.agent_id, failed.outcome) == ("gpu-a", LoadOutcome.FAILED)
    assert "engine" in failed.error
    # Exactly one retry, on the other agent. Who starts it is a race with two right answers:
    # the failed load's task (fail_load's retry: FAILURE), or the waiting request, which sees
    # the placement FAILED between fail_load's two transactions and asks again (REQUEST);
    # either way under the model's lock, so never both, and never on the agent that failed.
    assert retried.agent.agent_id == "gpu-b"
    assert retried.trigger in (LoadTrigger.FAILURE, LoadTrigger.REQUEST)
    failed_placement = Placement.objects.get(agent__agent_id="gpu-a")
    assert failed_placement.state == PlacementState.FAILED


def test_idle_models_step_down_and_pinned_ones_stay(fleet, tmp_path, tiny):
    plane, stack = fleet
    plane.agent(stack, tmp_path, "gpu-a", *SIM)
    registered("gpu-a")
    catalog("org/tiny", tiny, keep_alive=timedelta(seconds=2))
    catalog("org/pinned", tiny, keep_alive=timedelta(seconds=2), pinned=True)
    client = client_for(plane.url)
    assert ask(client)
    assert ask(client, "org/pinned")

    def level(model_id: str) -> str:
        return Placement.objects.get(model__model_id=model_id).cache_level

    # Host RAM after 2 s idle, local disk after 4 s: the steps are checked in the events below.
    wait_for(lambda: level("org/tiny") == CacheLevel.NVME_CACHED, 30, "two steps down")
    pinned = Placement.objects.get(model__model_id="org/pinned")
    assert (pinned.state, pinned.cache_level) == (PlacementState.READY, CacheLevel.GPU_RESIDENT)
    steps = LoadEvent.objects.filter(model__model_id="org/tiny", kind=LoadEventKind.UNLOAD)
    assert [(s.to_level, s.trigger) for s in steps.order_by("queued_at")] == [
        (CacheLevel.DRAM_CACHED, LoadTrigger.KEEP_ALIVE),
        (CacheLevel.NVME_CACHED, LoadTrigger.KEEP_ALIVE),
    ]
    assert ask(client)  # cold again, from the local cache
    again = loads()[-1]
    assert again.from_level == CacheLevel.NVME_CACHED
    assert again.download_seconds is None


def test_a_request_keep_alive_extends_or_shortens_its_replica_time_on_the_gpu(
    fleet, tmp_path, tiny
):
    plane, stack = fleet
    plane.agent(stack, tmp_path, "gpu-a", *SIM)
    registered("gpu-a")
    catalog("org/kept", tiny, keep_alive=timedelta(seconds=2))
    catalog("org/plain", tiny, keep_alive=timedelta(seconds=2))
    catalog("org/brief", tiny, keep_alive=timedelta(hours=1))
    client = client_for(plane.url)

    def ask_keeping(model: str, keep_alive: object) -> None:
        answer = client.chat.completions.create(
            model=model, messages=HELLO, max_tokens=3, extra_body={"keep_alive": keep_alive}
        )
        assert answer.choices[0].message.content

    ask_keeping("org/kept", "10m")
    ask_keeping("org/brief", 0)
    assert ask(client, "org/plain")

    def level(model_id: str) -> str:
        return Placement.objects.get(model__model_id=model_id).cache_level

    # `0` takes a one-hour model down as soon as it is idle; the model that did not ask
    # goes after its own 2 s; the one that asked for 10 minutes stays.
    wait_for(lambda: level("org/brief") == CacheLevel.NVME_CACHED, 30, "org/brief stepped down")
    wait_for(lambda: level("org/plain") == CacheLevel.NVME_CACHED, 30, "org/plain stepped down")
    kept = Placement.objects.get(model__model_id="org/kept")
    assert (kept.state, kept.cache_level) == (PlacementState.READY, CacheLevel.GPU_RESIDENT)
    assert kept.keep_alive == timedelta(minutes=10)
    assert not LoadEvent.objects.filter(model__model_id="org/kept", kind=LoadEventKind.UNLOAD)
    assert Placement.objects.get(model__model_id="org/brief").keep_alive == timedelta(0)


def test_drain_moves_traffic_to_another_agent(fleet, tmp_path, tiny):
    plane, stack = fleet
    plane.agent(stack, tmp_path, "gpu-a", *SIM)
    plane.agent(stack, tmp_path, "gpu-b", *SIM)
    registered("gpu-a", "gpu-b")
    catalog("org/tiny", tiny)
    client = client_for(plane.url)
    assert ask(client)
    assert [load.agent.agent_id for load in loads()] == ["gpu-a"]
    actions.drain_agent("gpu-a")
    assert ask(client)
    assert [load.agent.agent_id for load in loads()] == ["gpu-a", "gpu-b"]
    # A heartbeat does not undo the drain.
    wait_for(
        lambda: Agent.objects.get(agent_id="gpu-a").last_heartbeat_at is not None, 10, "a beat"
    )
    assert Agent.objects.get(agent_id="gpu-a").state == AgentState.DRAINING


def test_a_deleted_model_leaves_every_agent_even_one_that_was_down(fleet, tmp_path, tiny):
    plane, stack = fleet
    first = plane.agent(stack, tmp_path, "gpu-a", *SIM)
    second = plane.agent(stack, tmp_path, "gpu-b", *SIM)
    registered("gpu-a", "gpu-b")
    serving_on(catalog("org/tiny", tiny, max_replicas=2), "gpu-a", "gpu-b")
    assert ask(client_for(plane.url))
    wait_for(lambda: Usage.objects.filter(model_id="org/tiny").exists(), 10, "the usage")
    second.process.kill()  # down while the model is deleted: nobody can tell it now
    second.process.wait()

    actions.delete_model("org/tiny")
    wait_for(lambda: not first.heartbeat()["models"], 30, "gpu-a to stop the deleted model")
    assert not list((first.cache_dir / "models").iterdir())  # its files went too
    back = plane.agent(stack, tmp_path, "gpu-b", *SIM)  # the same cache: the model's files
    wait_for(lambda: not back.heartbeat()["models"], 30, "gpu-b to unload it once back")
    assert not list((back.cache_dir / "models").iterdir())
    assert Usage.objects.get(model_id="org/tiny").requests == 1  # billing history stays
