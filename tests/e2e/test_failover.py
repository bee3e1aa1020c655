"""No request lost, for real: replicas that stop serving, clients that leave, agents that stop
gracefully, and loads that never starve the heartbeats. daphne, both Celery workers, beat,
PostgreSQL, Redis, sim node agents and the openai client."""

from __future__ import annotations

import re
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from agents import actions
from agents.choices import AgentState, LoadEventKind, PlacementState
from agents.models import Agent, LoadEvent, Placement
from controlplane.gateway.models import Usage
from nodeagent import tinymodel
from nodeagent.engines.simanswers import words_for
from tests.e2e.agent_process import AgentProcess
from tests.e2e.fleet import SCRAPER, ControlPlane, registered, running_control_plane, serving_on
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SIM = ["--engine", "sim", "--sim-load-seconds", "0.2", "--sim-ttft-ms", "1", "--sim-tpot-ms", "1"]
HELLO: Any = [{"role": "user", "content": "hello there"}]
# Heartbeats every 30 s: what the fleet state says between them is the gateway's doing.
QUIET = {"HEARTBEAT_INTERVAL_SECONDS": "30", "HEARTBEAT_TIMEOUT_SECONDS": "3"}
SLOW = [*SIM[:-1], "20"]  # 20 ms a token


@pytest.fixture
def tiny(tmp_path_factory):
    return tinymodel.build(tmp_path_factory.mktemp("tiny") / "tiny").as_uri()


@dataclass
class Fleet:
    plane: ControlPlane
    stack: ExitStack
    tmp_path: Path

    def agent(self, name: str, *args: str) -> AgentProcess:
        return self.plane.agent(self.stack, self.tmp_path, name, *(args or SIM))


@pytest.fixture
def quiet(settings, tmp_path):
    """The fleet with heartbeats every 30 s."""
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path, **QUIET))
        yield Fleet(plane, stack, tmp_path)


@pytest.fixture
def fleet(settings, tmp_path):
    """The fleet with heartbeats every second (tests/e2e/fleet.py FAST)."""
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        yield Fleet(plane, stack, tmp_path)


def client_for(url: str, name: str = "failover") -> openai.OpenAI:
    _, raw_key = make_api_key(name)
    return openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0, timeout=60)


def ask(client: openai.OpenAI, user: str | None = None, max_tokens: int = 4) -> str:
    answer = client.chat.completions.create(
        model="org/tiny", messages=HELLO, max_tokens=max_tokens, user=user or openai.omit
    )
    return answer.choices[0].message.content or ""


def loads() -> int:
    return LoadEvent.objects.filter(kind=LoadEventKind.LOAD).count()


def gateway_in_flight(plane: ControlPlane) -> float:
    text = requests.get(f"{plane.url}/metrics", timeout=5, headers=SCRAPER).text
    return sum(
        float(value)
        for value in re.findall(r"^llmfleet_gateway_requests_in_flight\{.*\} (\S+)$", text, re.M)
    )


def test_a_replica_whose_engine_is_gone_is_skipped_and_marked_at_once(quiet, tiny):
    plane = quiet.plane
    with_agents = [quiet.agent(name) for name in ("gpu-a", "gpu-b")]
    first, second = registered("gpu-a", "gpu-b")
    model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1, max_replicas=2)
    serving_on(model, "gpu-a", "gpu-b")
    before = loads()
    # gpu-a's engine goes away behind the control plane's back: the agent now answers
    # 404 model_not_found, and no heartbeat comes for 30 s to say so.
    gone = with_agents[0].post("/unload_model", {"model_id": "org/tiny", "to": "NONE"})
    assert gone.status_code == 200
    client = client_for(plane.url)
    expected = " ".join(words_for("hello there", 4))
    for number in range(8):  # different users: some prefer gpu-a first
        assert ask(client, user=f"user-{number}") == expected
    failed = Placement.objects.get(agent=first)
    assert failed.state == PlacementState.FAILED
    assert failed.error.startswith("gateway: model_not_found")
    assert Placement.objects.get(agent=second).state == PlacementState.READY
    assert loads() == before  # another replica was there: nothing to load
    plane_log = plane.log("web")
    assert plane_log.count("failed before the first byte") == 1  # marked once, for all


def test_with_no_replica_left_the_request_is_held_and_the_model_cold_starts(quiet, tiny):
    plane = quiet.plane
    agent = quiet.agent("gpu-a")
    registered("gpu-a")
    model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1)
    serving_on(model, "gpu-a")
    agent.post("/unload_model", {"model_id": "org/tiny", "to": "NVME_CACHED"})
    client = client_for(plane.url)
    stream = client.chat.completions.create(
        model="org/tiny", messages=HELLO, max_tokens=4, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == " ".join(words_for("hello there", 4))
    assert ask(client) == text
    operator, cold = LoadEvent.objects.filter(kind=LoadEventKind.LOAD).order_by("queued_at")
    assert (operator.trigger, cold.trigger) == ("OPERATOR", "REQUEST")  # one load, then warm


def test_in_flight_counts_are_right_whenever_clients_leave(quiet, tiny):
    plane = quiet.plane
    agent = quiet.agent("gpu-a", *SLOW)
    registered("gpu-a")
    model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1)
    serving_on(model, "gpu-a")
    key, raw_key = make_api_key("leaver")
    headers = {"Authorization": f"Bearer {raw_key}"}
    url = f"{plane.url}/v1/chat/completions"
    long = {"model": "org/tiny", "messages": HELLO, "max_tokens": 500}
    # Before the headers: a non-streaming answer's headers come with its body (10 s away).
    with pytest.raises(requests.ReadTimeout):
        requests.post(url, json=long, headers=headers, timeout=(5, 1))
    # Mid-stream, after a few tokens.
    response = requests.post(
        url, json={**long, "stream": True}, headers=headers, stream=True, timeout=30
    )
    events = (line for line in response.iter_lines() if line)
    for _ in range(5):
        assert next(events).startswith(b"data: ")
    response.close()
    # And one that ends as it should.
    assert (
        requests.post(url, json={**long, "max_tokens": 3}, headers=headers, timeout=30).status_code
        == 200
    )

    def settled() -> bool:
        models = agent.heartbeat()["models"]
        return gateway_in_flight(plane) == 0 and models[0]["requests_in_flight"] == 0

    wait_for(settled, 15, "every count back to zero")
    # The stream the client left was charged what it was sent; the request that left
    # before its headers, its prompt.
    written = Usage.objects.filter(api_key=key, requests=3)
    wait_for(written.exists, 10, "the three requests' usage written")
    usage = written.get()
    assert usage.completion_tokens >= 3 + 4  # the finished answer, the stream's tokens
    assert usage.prompt_tokens >= 3


def test_a_stopping_agent_finishes_its_streams_and_traffic_moves_on(quiet, tiny):
    plane = quiet.plane
    stopping = quiet.agent("gpu-a", *SLOW)
    quiet.agent("gpu-b", *SLOW)
    [first] = registered("gpu-a")
    registered("gpu-b")
    model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1, max_replicas=2)
    serving_on(model, "gpu-a", "gpu-b")
    client = client_for(plane.url)
    expected = " ".join(words_for("hello there", 100))
    streams = [
        client.chat.completions.create(
            model="org/tiny", messages=HELLO, max_tokens=100, stream=True, user=f"u{n}"
        )
        for n in range(6)
    ]
    firsts = [next(iter(stream)) for stream in streams]
    assert all(chunk.choices for chunk in firsts)
    stopping.process.send_signal(signal.SIGTERM)
    # The agent says so at once: no heartbeat comes for 30 s.
    wait_for(lambda: Agent.objects.get(pk=first.pk).state == AgentState.DRAINING, 5, "drain")
    during = [ask(client, user=f"new-{n}") for n in range(6)]
    assert during == [" ".join(words_for("hello there", 4))] * 6

    def rest(stream: Any) -> str:
        return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

    texts = [
        (first.choices[0].delta.content or "") + rest(s)
        for first, s in zip(firsts, streams, strict=True)
    ]
    assert texts == [expected] * 6  # none cut
    stopping.process.wait(timeout=30)
    assert "drain period over" not in stopping.log()


def test_heartbeats_stay_on_time_while_many_loads_wait_on_slow_engines(fleet, tiny):
    plane = fleet.plane
    slow_load = ["--engine", "sim", "--sim-load-seconds", "120"]
    fleet.agent("gpu-a", *slow_load)
    doomed = fleet.agent("gpu-b", *slow_load)
    registered("gpu-a", "gpu-b")
    # 32 cold starts, as 32 clients' requests make them (the gateway calls this), each
    # load then held by its engine for 120 s.
    for number in range(32):
        model, _ = actions.register_catalog_model(f"org/m{number}", tiny, size_bytes=1)
        actions.ensure_placement(model)
    wait_for(
        lambda: LoadEvent.objects.filter(started_at__isnull=False, outcome="PENDING").count() == 32,
        30,
        "32 loads under way on the agents",
    )
    rounds_before = plane.log("worker").count("polled 2 agent(s)")
    killed_at = time.monotonic()
    doomed.process.send_signal(signal.SIGKILL)
    # Two missed beats, a second apart (FAST): OFFLINE in seconds, not after the loads.
    wait_for(
        lambda: Agent.objects.get(agent_id="gpu-b").state == AgentState.OFFLINE,
        15,
        "the killed agent to be OFFLINE",
    )
    print(f"OFFLINE {time.monotonic() - killed_at:.1f} s after SIGKILL, 32 loads under way")
    assert Agent.objects.get(agent_id="gpu-a").state != AgentState.OFFLINE
    # The rounds go on while the loads wait (each a second apart): the worker's
    # threads held by 32 loads never delay the heartbeat task.
    wait_for(
        lambda: plane.log("worker").count("polled 2 agent(s)") - rounds_before >= 3,
        15,
        "three heartbeat rounds while the 32 loads wait",
    )
