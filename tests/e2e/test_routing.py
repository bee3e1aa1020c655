"""Cache-aware routing for real: two web replicas (one behind haproxy), four sim node agents,
PostgreSQL, Redis, Celery and the openai client. A conversation's turns land on one engine
replica whichever web replica takes them; a replica that stops serving is routed around."""

from __future__ import annotations

import re
from contextlib import ExitStack

import openai
import pytest
import requests

from agents import actions
from agents.choices import PlacementState
from agents.models import Placement
from nodeagent import tinymodel
from tests.e2e.agent_process import AgentProcess
from tests.e2e.faults import haproxy
from tests.e2e.fleet import SCRAPER, registered, running_control_plane, serving_on
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


def turn(client: openai.OpenAI, messages: list) -> str:
    answer = client.chat.completions.create(model="org/tiny", messages=messages, max_tokens=4)
    return answer.choices[0].message.content or ""


def system_prompt(topic: int) -> str:
    return f"Topic {topic}. " + " ".join(f"rule-{topic}-{n}" for n in range(300))


def test_a_conversations_turns_land_on_one_replica_from_every_web_replica(settings, tmp_path):
    with ExitStack() as stack:
        plane = stack.enter_context(
            running_control_plane(settings, tmp_path, web_replicas=2, **QUIET)
        )
        balancer = stack.enter_context(haproxy(tmp_path, plane.web_urls))
        agents = {name: plane.agent(stack, tmp_path, name, *SIM) for name in NAMES}
        registered(*NAMES)
        tiny = tinymodel.build(tmp_path / "tiny").as_uri()
        model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1, max_replicas=4)
        serving_on(model, *NAMES)
        _, raw_key = make_api_key("routing")
        clients = [
            openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0, timeout=60)
            for url in (*plane.web_urls, balancer)
        ]
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
