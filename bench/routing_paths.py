"""The paths bench/routing.py sends its traffic through, each on fresh sim engines: llmfleet (a
web process or two and four node agents, under one routing policy), and four standalone engines
behind vllm-router or sglang-router."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import requests
from peers import peer_program, vllm_router_command
from routing_traffic import BLOCK_TOKENS, ENGINES, Reading, Sizes
from stack import ROOT, AgentProc, answers, manage, start, stop

from tests.support import free_port, wait_for

SGLANG_ROUTER_VENV = ROOT / ".venv-sglang-router"
TPOT_MS = 1.0


def counters(text: str, hits_name: str, queries_name: str, ttft_name: str) -> Reading:
    """An engine's prefix-cache counters and TTFT histogram, from its (or its agent's) /metrics."""

    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))

    buckets: dict[float, float] = {}
    for le, count in re.findall(rf'^{ttft_name}_bucket\{{[^}}]*le="([^"]+)"[^}}]*\}} (\S+)$',
                                text, re.M):  # fmt: skip
        buckets[float(le)] = buckets.get(float(le), 0.0) + float(count)
    return Reading(total(hits_name), total(queries_name), buckets)


class Llmfleet:
    """A web process and four node agents on fresh sim engines, under one routing policy."""

    def __init__(self, policy: str, env: dict[str, str], work: Path, sizes: Sizes, tag: str,
                 webs: int = 1):  # fmt: skip
        self.policy, self.work, self.tag, self.webs = policy, work, tag, webs
        self.model = f"bench/route-{tag}"
        self.env = env | {
            "GATEWAY_ROUTING_POLICY": policy,
            "AGENT_SIM_CACHE_BLOCKS": str(sizes.cache_blocks),
            "AGENT_SIM_BLOCK_TOKENS": str(BLOCK_TOKENS),
            "AGENT_SIM_PREFILL_MS_PER_TOKEN": str(sizes.prefill_ms),
            "GATEWAY_WEB_PROCESSES": str(webs),  # as an operator sets it for several
        }
        self.agents = [
            AgentProc(f"{tag}-{n}", ROOT, self.env, work, TPOT_MS) for n in range(ENGINES)
        ]
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Llmfleet:
        checkpoint = self.work / "checkpoint"
        checkpoint.mkdir(exist_ok=True)
        (checkpoint / "config.json").write_text("{}")
        urls = []
        for agent in self.agents:
            self.processes.append(agent.start())
            urls.append(requests.post(
                f"http://127.0.0.1:{agent.port}/load_model",
                json={"model_id": self.model, "source": checkpoint.as_uri(), "engine": {"args": []}},
                headers=agent.auth, timeout=30,
            ).json()["inference_endpoint_url"])  # fmt: skip
        names = [agent.name for agent in self.agents]
        manage(
            "from agents.models import Agent, Model, Placement\n"
            f"m = Model.objects.create(model_id='{self.model}', source='file:///x', max_replicas=4)\n"
            f"for name, url in zip({names!r}, {urls!r}):\n"
            "    Placement.objects.create(agent=Agent.objects.get(agent_id=name), model=m, "
            "state='READY', cache_level='GPU_RESIDENT', inference_endpoint_url=url, "
            "max_num_seqs=256)\n"  # what the agents report for their sims (stack.SIM)
            "print('ok')",
            self.env,
        )
        self.ports = [free_port() for _ in range(self.webs)]
        for n, port in enumerate(self.ports):
            self._start_web(port, self.env, f"web-{self.tag}-{n}.log")
        self.web = self.processes[-self.webs]  # the first web process: its CPU is read
        return self

    def _start_web(self, port: int, env: dict[str, str], log: str) -> None:
        web = start([sys.executable, "-m", "controlplane.web", "--port", str(port)], env,
                    self.work / log)  # fmt: skip
        self.processes.append(web)
        wait_for(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 30, "a web process")

    def web_under(self, policy: str) -> str:
        """The chat URL of one more web process, under `policy`, in front of the same agents:
        what differs between it and the others is the routing alone."""
        port = free_port()
        self._start_web(port, self.env | {"GATEWAY_ROUTING_POLICY": policy},
                        f"web-{self.tag}-{policy}.log")  # fmt: skip
        return f"http://127.0.0.1:{port}/v1/chat/completions"

    def __exit__(self, *exc: object) -> None:
        stop(self.processes)

    def follow_feeds(self, auth: dict[str, str], urls: list[str] | None = None) -> None:
        """Under `precise`: once every web process (of `urls`, else the fleet's) follows the
        four engines' KV events (a first request starts following; until the feeds are live,
        routing is cache_aware's)."""
        scraper = {"Authorization": f"Bearer {self.env['AGENT_TOKEN']}"}
        hello = {"model": self.model, "messages": [{"role": "user", "content": "hello"}],
                 "max_tokens": 1}  # fmt: skip
        for url in urls or self.urls:
            requests.post(url, json=hello, headers=auth, timeout=30).raise_for_status()
            metrics = url.replace("/v1/chat/completions", "/metrics")
            wait_for(lambda: requests.get(metrics, headers=scraper, timeout=5).text.count(  # noqa: B023
                "llmfleet_gateway_kv_blocks{") == ENGINES, 30, "the engines' KV feeds")  # fmt: skip

    @property
    def url(self) -> str:
        return self.urls[0]

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}/v1/chat/completions" for port in self.ports]

    def engine_counters(self) -> list[Reading]:
        return [
            counters(
                requests.get(f"http://127.0.0.1:{a.port}/metrics", headers=a.auth, timeout=5).text,
                "llmfleet_agent_engine_prefix_cache_hits", "llmfleet_agent_engine_prefix_cache_queries",
                "llmfleet_agent_engine_time_to_first_token_seconds",
            )
            for a in self.agents
        ]  # fmt: skip


class Engines:
    """Four standalone sim engines with fresh caches, for the routers."""

    MODEL = "bench/route"

    def __init__(self, work: Path, sizes: Sizes, tag: str, kv_events: bool = False) -> None:
        self.ports = [free_port() for _ in range(ENGINES)]
        # With `kv_events`, each publishes its KV events (bound, as vLLM binds tcp://*:P).
        self.event_ports = [free_port() for _ in range(ENGINES)] if kv_events else []
        argv = [sys.executable, "-m", "nodeagent.engines.sim", "--model-id", self.MODEL,
                "--ttft-ms", "0", "--tpot-ms", str(TPOT_MS), "--max-num-seqs", "256",
                "--block-tokens", str(BLOCK_TOKENS), "--cache-blocks", str(sizes.cache_blocks),
                "--prefill-ms-per-token", str(sizes.prefill_ms), "--event-loop", "uvloop",
                "--enable-scale-out"]  # fmt: skip
        self.processes = []
        for n, port in enumerate(self.ports):
            log = work / f"engine-{tag}-{n}.log"
            events = (["--kv-events-endpoint", f"tcp://*:{self.event_ports[n]}"]
                      if kv_events else [])  # fmt: skip
            self.processes.append(
                start([*argv, "--port", str(port), *events], os.environ.copy(), log)
            )
        for port in self.ports:
            wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), 30, "a sim engine")  # noqa: B023

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{port}" for port in self.ports]

    def engine_counters(self) -> list[Reading]:
        return [
            counters(requests.get(f"{url}/metrics", timeout=5).text,
                     "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total",
                     "vllm:time_to_first_token_seconds")
            for url in self.urls
        ]  # fmt: skip


def sglang_router_python() -> Path:
    """The Python of sglang-router's own virtual environment (its router is a module; its
    console script says that the environment was built whole)."""
    installed = peer_program(SGLANG_ROUTER_VENV, "sglang-router-bench.txt", "sglang-router")
    return installed.parent / "python"


def router_argv(name: str, port: int, engines: Engines) -> list[str]:
    """A router in front of `engines`: `vllm-router kv_aware` matches the engines' KV
    events (each engine's ZMQ endpoint; the prompts' tokens from the engines' render
    endpoints); the others run `cache_aware`."""
    workers = engines.urls
    policy = "kv_aware" if name == "vllm-router kv_aware" else "cache_aware"
    common = ["--host", "127.0.0.1", "--port", str(port), "--worker-urls", *workers,
              "--policy", policy]  # fmt: skip
    if policy == "kv_aware":
        for url, events in zip(workers, engines.event_ports, strict=True):
            common += ["--kv-event-source", f"{url}=tcp://127.0.0.1:{events}"]
        common += ["--kv-event-block-size", str(BLOCK_TOKENS), "--kv-event-model", Engines.MODEL]
    if name.startswith("vllm-router"):
        return [str(vllm_router_command()), *common, "--log-level", "warning"]
    return [str(sglang_router_python()), "-m", "sglang_router.launch_router", *common,
            "--log-level", "warn"]  # fmt: skip
