"""Cache-aware routing with real vLLM on the CPU: two agents serving the tiny model, each
engine's KV cache too small for all of the test's prefixes, the same prefix-heavy traffic
through the official openai client under `least_loaded` and under `cache_aware`, and the
engines' own prefix-cache counters (vLLM's `vllm:prefix_cache_hits` and
`vllm:prefix_cache_queries`, read through each agent's /metrics)."""

from __future__ import annotations

import json
import random
import re
from contextlib import ExitStack

import openai
import pytest
import requests

from agents import actions
from agents.models import Placement
from agents.scheduling import ReplicaLoad, choose_cached_replica
from controlplane.gateway.apis import Api
from controlplane.gateway.kvfollow import PromptBlocks
from controlplane.gateway.prefix import prefix_of
from controlplane.gateway.tokens import ModelTokenizer
from nodeagent import tinymodel
from nodeagent.kvblocks import block_chain, chain_root
from nodeagent.kvevents import TOKENIZER_FILES
from nodeagent.tinymodel import CORPUS
from tests.e2e.agent_process import AgentProcess, engine_python
from tests.e2e.fleet import SCRAPER, registered, running_control_plane, serving_on
from tests.e2e.test_vllm_agent import CPU_ARGS
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# A KV cache of 3,072 tokens (the tiny model's KV is 2 KiB a token): 24 of vLLM's 128-token
# CPU blocks. Each prompt fills three, so an engine holds six prompts, not eight.
ENGINE_ARGS = [
    *CPU_ARGS[: CPU_ARGS.index("--kv-cache-memory-bytes")], "--kv-cache-memory-bytes", "6M",
    *CPU_ARGS[CPU_ARGS.index("--kv-cache-memory-bytes") + 2 :],
]  # fmt: skip
PROMPTS = 8
ROUNDS = 4
WORDS = sorted(set(CORPUS.lower().replace(".", " ").replace(",", " ").split()))
# Heartbeats every 30 s: the load each replica reports stays as it was, so `least_loaded`
# sends sequential requests to one replica, as it would on a quiet fleet.
QUIET = {"HEARTBEAT_INTERVAL_SECONDS": "30", "HEARTBEAT_TIMEOUT_SECONDS": "3"}


def system_prompt(rng: random.Random) -> str:
    """About 460 of the tiny tokenizer's tokens (its corpus's words): three full KV blocks."""
    return " ".join(rng.choice(WORDS) for _ in range(270))


def messages(system: str, number: int) -> list:
    return [{"role": "system", "content": system}, {"role": "user", "content": f"q {number}?"}]


def split_by_home(
    seed: int, model_pk: int, placements: list[Placement], reader: ModelTokenizer | None = None
) -> list[str]:
    """PROMPTS system prompts whose homes (the replica cache-aware routing sends a new prefix
    to; under precise routing, with the model's `reader`, by its first KV block) are half on
    each replica: a fleet's many prefixes spread so on average, and the test's eight are
    made to, so that each engine is asked for four."""
    rng = random.Random(seed)
    loads = [ReplicaLoad(str(p.pk)) for p in placements]
    by_home: dict[str, list[str]] = {load.key: [] for load in loads}
    while any(len(found) < PROMPTS // 2 for found in by_home.values()):
        system = system_prompt(rng)
        body = {"messages": messages(system, 0)}
        home = prefix_of(Api.CHAT, body, str(model_pk), 65536).home
        if reader is not None:
            names = PromptBlocks(Api.CHAT, body, "org/tiny", "org/tiny", 65536).names(
                "model", 128, reader)  # fmt: skip
            assert names
            home = f"{names[0]:016x}"
        chosen = choose_cached_replica(loads, {}, home, balance=4)
        assert chosen is not None
        by_home[chosen[0].key].append(system)
    return [system for found in by_home.values() for system in found[: PROMPTS // 2]]


def prefix_counters(agents: list[AgentProcess]) -> tuple[float, float]:
    hits = queries = 0.0
    for agent in agents:
        text = requests.get(f"{agent.url}/metrics", headers=agent.headers, timeout=10).text
        for name, value in re.findall(
            r'^llmfleet_agent_engine_prefix_cache_(hits|queries)\{model="org/tiny"\} (\S+)$',
            text, re.M,
        ):  # fmt: skip
            if name == "hits":
                hits += float(value)
            else:
                queries += float(value)
    return hits, queries


def traffic(url: str, key: str, systems: list[str], agents: list[AgentProcess]) -> float:
    """Every system prompt once per round, one request at a time, rounds in the same order;
    the engines' prefix-cache hit ratio over it."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
    hits, queries = prefix_counters(agents)
    for number in range(ROUNDS):
        for system in systems:
            client.chat.completions.create(
                model="org/tiny", max_tokens=2, messages=messages(system, number)
            )
    after_hits, after_queries = prefix_counters(agents)
    return (after_hits - hits) / (after_queries - queries)


def test_cache_aware_routing_finds_more_of_vllms_prefix_cache_than_load_alone(settings, tmp_path):
    tiny = tinymodel.build(tmp_path / "tiny")
    with ExitStack() as stack:
        plane = stack.enter_context(
            running_control_plane(settings, tmp_path, GATEWAY_ROUTING_POLICY="cache_aware", **QUIET)
        )
        least_url = plane.another_web("web-least", GATEWAY_ROUTING_POLICY="least_loaded")
        precise_url = plane.another_web("web-precise", GATEWAY_ROUTING_POLICY="precise")
        python = engine_python()
        agents = [
            plane.agent(stack, tmp_path, name, "--engine", "vllm", "--engine-python", python)
            for name in ("cpu-1", "cpu-2")
        ]
        registered("cpu-1", "cpu-2")
        model, _ = actions.register_catalog_model(
            "org/tiny", tiny.as_uri(), size_bytes=1, engine_args=ENGINE_ARGS, max_replicas=2
        )
        serving_on(model, "cpu-1", "cpu-2", seconds=600)
        placements = list(Placement.objects.filter(model=model))
        _, key = make_api_key("routing")
        # Each policy its own prompts: neither finds the other's in the caches.
        aware = traffic(plane.url, key, split_by_home(1, model.pk, placements), agents)
        least = traffic(least_url, key, split_by_home(2, model.pk, placements), agents)
        print(f"prefix-cache hit ratio: cache_aware {aware:.3f}, least_loaded {least:.3f}")
        # cache_aware: four prompts an engine, which it holds: every round after the first
        # hits their three full blocks (about 0.6 of the tokens). least_loaded: all eight on
        # the replica it prefers, round after round, more than its cache holds: each prompt's
        # blocks are gone by the time it comes back (about none).
        assert aware > 0.4
        assert aware > least + 0.3

        # Precise routing on vLLM: each engine's KV events (the agent adds --kv-events-config)
        # as its agent names them are the blocks of what the engine was asked, named from the
        # tokens vLLM itself saw, and the gateway reads a request into those same tokens.
        system = split_by_home(3, model.pk, placements)[0]
        body = {"model": "org/tiny", "messages": messages(system, 1), "max_tokens": 1,
                "return_token_ids": True}  # fmt: skip
        answer = agents[0].post("/models/org/tiny/v1/chat/completions", body)
        assert answer.status_code == 200, answer.text
        tokens = answer.json()["prompt_token_ids"]
        files = {name: (tiny / name).read_bytes() for name in TOKENIZER_FILES
                 if (tiny / name).exists()}  # fmt: skip
        assert ModelTokenizer.load(files).ids(Api.CHAT, body, 65536) == tokens
        head = engine_blocks(agents[0])
        expected = block_chain(tokens, head["block_size"], chain_root("org/tiny"))
        assert head["tokens"] == "model"
        assert len(expected) == len(tokens) // 128 >= 3
        wait_for(lambda: set(expected) <= set(engine_blocks(agents[0])["add"]), 10,
                 "the engine's blocks, named")  # fmt: skip
        dropped = requests.get(f"{agents[0].url}/metrics", headers=agents[0].headers, timeout=5)
        assert "llmfleet_agent_kv_events_dropped_total{" not in dropped.text

        # Through a web process under `precise`: it follows both engines' feeds, reads the
        # model's tokenizer from an agent, and finds what cache_aware finds (prompts of its
        # own: none is cached yet).
        client = openai.OpenAI(base_url=f"{precise_url}/v1", api_key=key, max_retries=0)
        client.chat.completions.create(model="org/tiny", max_tokens=1, messages=messages("", 0))
        wait_for(lambda: len(re.findall(r"^llmfleet_gateway_kv_blocks\{", requests.get(
            f"{precise_url}/metrics", headers=SCRAPER, timeout=5).text, re.M)) == 2, 20,
            "both engines followed")  # fmt: skip
        log = plane.logs / "web-precise.log"
        wait_for(lambda: "org/tiny: its tokenizer read" in log.read_text(), 20, "the tokenizer")
        reader = ModelTokenizer.load(files)
        precise = traffic(precise_url, key, split_by_home(4, model.pk, placements, reader), agents)
        print(f"prefix-cache hit ratio: precise {precise:.3f}")
        assert precise > least + 0.3


def engine_blocks(agent: AgentProcess) -> dict:
    """The first line of the agent's feed of its engine's KV blocks (fewer than 2,048 here)."""
    with requests.get(f"{agent.url}/models/org/tiny/kv", headers=agent.headers, stream=True,
                      timeout=10) as answer:  # fmt: skip
        assert answer.status_code == 200, answer.text
        return json.loads(next(answer.iter_lines()))
