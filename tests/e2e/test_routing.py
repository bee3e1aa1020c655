"""Cache-aware routing for real: two web replicas (one behind haproxy), four sim node agents,
PostgreSQL, Redis, Celery and the openai client. A conversation's turns land on one engine
replica whichever web replica takes them; a replica that stops serving is routed around."""

from __future__ import annotations

import re
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import openai
import pytest
import requests

from agents import actions
from agents.choices import PlacementState
from agents.models import Placement
from nodeagent import tinymodel
from tests.e2e.agent_process import AgentProcess
from tests.e2e.fleet import (
    SCRAPER,
    ControlPlane,
    registered,
    running_control_plane,
    serving_on,
)
from tests.e2e.injectors import haproxy
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SIM = ["--engine", "sim", "--sim-load-seconds", "0.2", "--sim-ttft-ms", "1", "--sim-tpot-ms", "1"]
NAMES = ("r1", "r2", "r3", "r4")
# Heartbeats every 30 s: what routing does between them is the gateway's own.
QUIET = {"HEARTBEAT_INTERVAL_SECONDS": "30", "HEARTBEAT_TIMEOUT_SECONDS": "3"}


def served(agents: dict[str, AgentProcess]) -> dict[str, float]:
    """Requests each agent has relayed (its own /metrics)."""
    counts = {}
    for name, agent in agents.items():
        text = requests.get(f"{agent.url}/metrics", headers=agent.headers, timeout=5).text
        found = re.findall(
            r'^llmfleet_agent_proxy_requests_total\{status="2xx"\} (\S+)$', text, re.M
        )
        counts[name] = float(found[0]) if found else 0.0
    return counts


def four_replicas(
    stack: ExitStack, settings: Any, tmp_path: Path, agent_args: list[str], **env: str
) -> tuple[ControlPlane, dict[str, AgentProcess]]:
    """Two web processes (told so, as an operator does) and four sim agents, each serving
    org/tiny."""
    plane = stack.enter_context(running_control_plane(
        settings, tmp_path, web_replicas=2, GATEWAY_WEB_PROCESSES="2", **QUIET, **env
    ))  # fmt: skip
    agents = {name: plane.agent(stack, tmp_path, name, *agent_args) for name in NAMES}
    registered(*NAMES)
    tiny = tinymodel.build(tmp_path / "tiny").as_uri()
    model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1, max_replicas=4)
    serving_on(model, *NAMES)
    return plane, agents


def clients_of(*urls: str) -> list[openai.OpenAI]:
    _, raw_key = make_api_key("routing")
    return [
        openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0, timeout=60)
        for url in urls
    ]


def turn(client: openai.OpenAI, messages: list) -> str:
    answer = client.chat.completions.create(model="org/tiny", messages=messages, max_tokens=4)
    return answer.choices[0].message.content or ""


def system_prompt(topic: int) -> str:
    return f"Topic {topic}. " + " ".join(f"rule-{topic}-{n}" for n in range(300))


def test_a_conversations_turns_land_on_one_replica_from_every_web_replica(settings, tmp_path):
    with ExitStack() as stack:
        plane, agents = four_replicas(stack, settings, tmp_path, SIM)
        balancer = stack.enter_context(haproxy(tmp_path, plane.web_urls))
        clients = clients_of(*plane.web_urls, balancer)
        homes: dict[int, str] = {}
        for topic in range(8):
            messages: list = [{"role": "system", "content": system_prompt(topic)}]
            for number in range(6):  # each turn through another web replica (or haproxy)
                messages.append({"role": "user", "content": f"question {number}"})
                before = served(agents)
                reply = turn(clients[number % len(clients)], messages)
                after = served(agents)
                (where,) = [name for name in NAMES if after[name] > before[name]]
                assert homes.setdefault(topic, where) == where, (topic, number)
                messages.append({"role": "assistant", "content": reply})
        assert len(set(homes.values())) >= 2  # the conversations spread over the replicas
        decisions = requests.get(f"{plane.web_urls[1]}/metrics", headers=SCRAPER, timeout=5).text
        assert re.search(
            r'llmfleet_routing_decisions_total\{model="org/tiny",reason="prefix"\}', decisions
        )

        # The home of topic 0 stops serving: its next turn moves at once, and stays moved.
        gone = homes[0]
        agents[gone].post("/unload_model", {"model_id": "org/tiny", "to": "NONE"})
        messages = [{"role": "system", "content": system_prompt(0)}]
        moved = set()
        for number in range(4):
            messages.append({"role": "user", "content": f"again {number}"})
            before = served(agents)
            turn(clients[number % 2], messages)
            after = served(agents)
            moved |= {name for name in NAMES if after[name] > before[name]}
        assert gone not in moved
        wait_for(
            lambda: Placement.objects.get(agent__agent_id=gone).state == PlacementState.FAILED,
            10, "the replica marked",
        )  # fmt: skip


def kv_followed(web_url: str) -> dict[str, float]:
    """The blocks each agent's engine holds as the web process follows them (precise)."""
    text = requests.get(f"{web_url}/metrics", headers=SCRAPER, timeout=5).text
    found = re.findall(r'^llmfleet_gateway_kv_blocks\{agent="([^"]+)",model="org/tiny"\} (\S+)$',
                       text, re.M)  # fmt: skip
    return {agent: float(count) for agent, count in found}


def test_precise_routing_follows_what_each_engine_holds(settings, tmp_path):
    """GATEWAY_ROUTING_POLICY=precise: both web replicas follow the four engines' KV events.
    A prompt goes where an engine holds it; when that engine evicts it (traffic that never
    passed the gateway) and another engine holds it, it goes there, from either web."""
    small = [*SIM, "--sim-cache-blocks", "40", "--sim-block-tokens", "16"]
    with ExitStack() as stack:
        plane, agents = four_replicas(stack, settings, tmp_path, small,
                                      GATEWAY_ROUTING_POLICY="precise")  # fmt: skip
        clients = clients_of(*plane.web_urls)
        for client in clients:  # the first request starts following: the engines' feeds
            turn(client, [{"role": "user", "content": "hello"}])
        for url in plane.web_urls:
            wait_for(lambda url=url: len(kv_followed(url)) == 4, 20, "the four engines followed")

        # The agent's two new paths take its credential, and serve tokenizer files only.
        r1 = agents["r1"]
        base = f"{r1.url}/models/org/tiny"
        assert requests.get(f"{base}/tokenizer/tokenizer.json", headers=r1.headers,
                            timeout=5).status_code == 200  # fmt: skip
        for name in ("config.json", "..%2Fagent-credential", "model.safetensors"):
            refused = requests.get(f"{base}/tokenizer/{name}", headers=r1.headers, timeout=5)
            assert refused.status_code == 404, name
        for path in ("/tokenizer/tokenizer.json", "/kv"):
            assert requests.get(f"{base}{path}", timeout=5).status_code == 401
            wrong = {"Authorization": "Bearer not-the-credential"}
            assert requests.get(f"{base}{path}", headers=wrong, timeout=5).status_code == 401
        missing = requests.get(f"{r1.url}/models/org/none/kv", headers=r1.headers, timeout=5)
        assert missing.status_code == 404

        def where(client: openai.OpenAI, messages: list) -> str:
            before = served(agents)
            turn(client, messages)
            after = served(agents)
            (name,) = [name for name in NAMES if after[name] > before[name]]
            return name

        # ~19 blocks of 16 words: the engines hold two such prompts, not three.
        messages = [{"role": "system", "content": system_prompt(0)},
                    {"role": "user", "content": "question"}]  # fmt: skip
        home = where(clients[0], messages)
        wait_for(lambda: kv_followed(plane.web_urls[1]).get(home, 0) >= 18, 10, "blocks seen")
        assert where(clients[1], messages) == home  # the other web replica agrees

        # Another engine takes the prompt, straight through its agent; the home's engine evicts
        # it, filled with other prompts: neither passed the gateway.
        other = next(name for name in NAMES if name != home)
        body = {"model": "org/tiny", "messages": messages, "max_tokens": 2}
        path = "/models/org/tiny/v1/chat/completions"
        assert agents[other].post(path, body).status_code == 200
        for topic in (1, 2, 3):
            flood = {**body, "messages": [{"role": "user", "content": system_prompt(topic)}]}
            assert agents[home].post(path, flood).status_code == 200
        for url in plane.web_urls:
            wait_for(lambda url=url: kv_followed(url).get(other, 0) >= 18, 10, "blocks seen")
        for client in clients:
            assert where(client, messages) == other
        decisions = requests.get(f"{plane.web_urls[0]}/metrics", headers=SCRAPER, timeout=5).text
        assert re.search(
            r'llmfleet_routing_decisions_total\{model="org/tiny",reason="prefix"\}', decisions
        )
