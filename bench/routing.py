"""Cache-aware routing: the same prefix-heavy traffic through every policy, on four sim engines.

    .venv/bin/python bench/routing.py [--quick]

Four sim engines, each with a prefix cache modelled on vLLM's (blocks of 16 prompt tokens
keyed by all before them, least recently used out; `--cache-blocks` per engine, smaller
than the workload's working set) and a prefill time per prompt token it does not hold
(`--prefill-ms`), so that where a request goes decides its time to first token.

The workload: `--prompts` distinct system prompts of `--system-words` tokens, with
Zipf-like popularity (rank^-1.1), and `--conversations` multi-turn chats of `--turns`
turns, each on one system prompt. Each turn adds a user message and the assistant's
earlier answer (fixed text, so every path sees the same prompts). The requests go in the
same order at `--concurrency` everywhere: turn 1 of every chat in a shuffled order, then
turn 2, and so on. Each answer is streamed and its first token timed.

Paths, each on fresh engines (empty caches):

- llmfleet: a web process and four node agents, each running the sim in-process, under
  GATEWAY_ROUTING_POLICY `least_loaded` (load alone), `cache_aware` and `precise` (the
  engines' KV events, through the agents), and `cache_aware` with two web processes taking
  the requests in turn (as behind a load balancer);
- vllm-router `--policy cache_aware`, from `.venv-vllm-router` (requirements/vllm-router-bench.txt);
- vllm-router `--policy kv_aware`, fed by the same sim engines' KV events (each engine
  publishes them over ZMQ as vLLM does, and says a prompt's tokens at vLLM's render
  endpoints, which kv_aware asks);
- sglang-router `--policy cache_aware`, from `.venv-sglang-router`
  (requirements/sglang-router-bench.txt, built here the first time).

Both routers run with their defaults, in front of four standalone sim engines with the
same settings.

Reported per path:

- the engines' own prefix-cache hit ratio (vLLM's counters, read from the engines or
  through the agents' /metrics);
- TTFT p50 and p90;
- requests/s;
- max/mean of the prompt tokens each engine took;
- the web process's CPU per request.

Also reported:

- the oracle: the hit ratio of one cache as large as all four together, with every request
  in order, which no routing can beat;
- `imbalance`: cache_aware's max/mean load on a uniform workload (every prompt equally
  popular);
- `added_p50_ms`: what cache_aware adds to least_loaded's latency at concurrency 1.

`--quick` runs tiny sizes without the routers, so that the test suite runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import requests
from loadgen import p
from peers import peer_program, vllm_router_command
from stack import ROOT, AgentProc, answers, cpu_seconds, manage, start, stop

from nodeagent.engines.simcache import PrefixCache
from nodeagent.kvblocks import word_ids
from tests.support import free_port, wait_for

SGLANG_ROUTER_VENV = ROOT / ".venv-sglang-router"
BLOCK_TOKENS = 16
ENGINES = 4
TPOT_MS = 1.0
MAX_TOKENS = 4


@dataclass(frozen=True)
class Sizes:
    prompts: int
    system_words: int
    conversations: int
    turns: int
    cache_blocks: int
    prefill_ms: float
    concurrency: int


def workload(sizes: Sizes, seed: int, zipf: float = 1.1) -> list[list[dict[str, str]]]:
    """Every request's messages, in the order they are sent."""
    rng = random.Random(seed)  # noqa: S311 (a workload the same in every run, not a secret)
    systems = [
        " ".join(f"sys{n}-w{w}" for w in range(sizes.system_words)) for n in range(sizes.prompts)
    ]
    weights = [1 / (rank + 1) ** zipf for rank in range(sizes.prompts)]
    chats = [rng.choices(range(sizes.prompts), weights)[0] for _ in range(sizes.conversations)]
    order: list[list[dict[str, str]]] = []
    for turn in range(sizes.turns):
        for chat in rng.sample(range(sizes.conversations), sizes.conversations):
            messages = [{"role": "system", "content": systems[chats[chat]]}]
            for earlier in range(turn + 1):
                words = " ".join(f"c{chat}-t{earlier}-q{w}" for w in range(24))
                messages.append({"role": "user", "content": words})
                if earlier < turn:
                    answer = " ".join(f"c{chat}-t{earlier}-a{w}" for w in range(16))
                    messages.append({"role": "assistant", "content": answer})
            order.append(messages)
    return order


def oracle_hit_ratio(order: list[list[dict[str, str]]], sizes: Sizes) -> float:
    """One cache as large as all the engines' together, every request in order (the sim
    engine's prompt: the messages' contents, its tokens their words)."""
    cache = PrefixCache(BLOCK_TOKENS, sizes.cache_blocks * ENGINES)
    hits = queries = 0
    for messages in order:
        tokens = word_ids("\n".join(message["content"] for message in messages))
        hits += cache.serve(tokens, "oracle")
        queries += len(tokens)
    return hits / queries


@dataclass
class Run:
    hit_ratio: float
    ttft_p50: float
    ttft_p90: float
    rps: float
    imbalance: float
    cpu_ms_per_request: float = float("nan")


async def send_all(url: str | list[str], headers: dict[str, str], model: str,
                   order: list[list[dict[str, str]]], concurrency: int) -> tuple[list[float], float]:  # fmt: skip
    """Stream every request in order at `concurrency` (to several URLs: each request to the
    next, as a load balancer would): each one's time to first token (ms), and the wall
    seconds."""
    ttfts: list[float] = []
    urls = [url] if isinstance(url, str) else url
    pending = list(reversed(list(enumerate(order))))

    async def worker(session: aiohttp.ClientSession) -> None:
        while pending:
            number, messages = pending.pop()
            url = urls[number % len(urls)]
            body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
            started = time.perf_counter()
            first = None
            async with session.post(url, json=body) as response:
                assert response.status == 200, await response.text()
                async for line in response.content:
                    if first is None and line.startswith(b"data: {"):
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        if (choices[0].get("delta") or {}).get("content"):
                            first = time.perf_counter()
            ttfts.append(((first or time.perf_counter()) - started) * 1000)

    async with aiohttp.ClientSession(
        headers=headers, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return ttfts, time.perf_counter() - began


def counters(text: str, hits_name: str, queries_name: str) -> tuple[float, float]:
    def total(name: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", text, re.M))

    return total(hits_name), total(queries_name)


def summarize(before: list[tuple[float, float]], after: list[tuple[float, float]],
              ttfts: list[float], seconds: float) -> Run:  # fmt: skip
    hits = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    queries = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    mean = statistics.mean(queries)
    return Run(
        hit_ratio=sum(hits) / sum(queries), ttft_p50=p(ttfts, 50), ttft_p90=p(ttfts, 90),
        rps=len(ttfts) / seconds, imbalance=max(queries) / mean if mean else float("nan"),
    )  # fmt: skip


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
            "state='READY', cache_level='GPU_RESIDENT', inference_endpoint_url=url)\n"
            "print('ok')",
            self.env,
        )
        self.ports = [free_port() for _ in range(self.webs)]
        for n, port in enumerate(self.ports):
            web = start([sys.executable, "-m", "controlplane.web", "--port", str(port)],
                        self.env, self.work / f"web-{self.tag}-{n}.log")  # fmt: skip
            self.processes.append(web)
            wait_for(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 30, "a web process")  # noqa: B023
        self.web = self.processes[-self.webs]  # the first web process: its CPU is read
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.processes)

    def follow_feeds(self, auth: dict[str, str]) -> None:
        """Under `precise`: once every web process follows the four engines' KV events (a
        first request starts following; until the feeds are live, routing is cache_aware's)."""
        scraper = {"Authorization": f"Bearer {self.env['AGENT_TOKEN']}"}
        hello = {"model": self.model, "messages": [{"role": "user", "content": "hello"}],
                 "max_tokens": 1}  # fmt: skip
        for url in self.urls:
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

    def engine_counters(self) -> list[tuple[float, float]]:
        return [
            counters(
                requests.get(f"http://127.0.0.1:{a.port}/metrics", headers=a.auth, timeout=5).text,
                "llmfleet_agent_engine_prefix_cache_hits", "llmfleet_agent_engine_prefix_cache_queries",
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

    def engine_counters(self) -> list[tuple[float, float]]:
        return [
            counters(requests.get(f"{url}/metrics", timeout=5).text,
                     "vllm:prefix_cache_hits_total", "vllm:prefix_cache_queries_total")
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


async def latencies_c1(url: str, headers: dict[str, str], model: str, count: int) -> list[float]:
    """Non-streaming requests one at a time, a 2-chunk prompt each (hashed by cache_aware)."""
    body = {"model": model, "max_tokens": 1,
            "messages": [{"role": "user", "content": "x " * 600}]}  # fmt: skip
    out = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.read()
            out.append((time.perf_counter() - started) * 1000)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--system-words", type=int, default=400)
    parser.add_argument("--conversations", type=int, default=1500)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--cache-blocks", type=int, default=3000, help="per engine")
    parser.add_argument("--prefill-ms", type=float, default=0.05, help="per uncached token")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--no-routers", action="store_true", help="skip vllm-router, sglang-router")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no routers (CI)")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.system_words, args.conversations, args.turns = 8, 64, 16, 2
        args.cache_blocks, args.no_routers = 16, True
    sizes = Sizes(args.prompts, args.system_words, args.conversations, args.turns,
                  args.cache_blocks, args.prefill_ms, args.concurrency)  # fmt: skip
    order = workload(sizes, args.seed)
    uniform = workload(sizes, args.seed, zipf=0.0)
    oracle = oracle_hit_ratio(order, sizes)
    print(f"{len(order)} requests, {args.prompts} system prompts of {args.system_words} tokens, "
          f"{args.cache_blocks} blocks per engine; oracle hit ratio {oracle:.3f}", flush=True)  # fmt: skip

    work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-routing-"))
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "AGENT_TOKEN", "SECRET_KEY"}}  # fmt: skip
    env.update(VAR_DIR=str(work / "var"), AGENT_TOKEN="bench-token", SECRET_KEY="bench",
               LOG_LEVEL="WARNING", PYTHONPATH="")  # fmt: skip
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    key = manage("from controlplane.gateway.actions import create_api_key; "
                 "print(create_api_key('bench')[1])", env)  # fmt: skip
    auth = {"Authorization": f"Bearer {key}"}
    runs: dict[str, Run] = {}
    c1: dict[str, float] = {}
    try:
        for policy in ("least_loaded", "cache_aware", "precise"):
            with Llmfleet(policy, env, work, sizes, policy.replace("_", "")) as fleet:
                if policy == "precise":
                    fleet.follow_feeds(auth)
                before, cpu = fleet.engine_counters(), cpu_seconds(fleet.web.pid)
                ttfts, seconds = asyncio.run(send_all(fleet.url, auth, fleet.model, order,
                                                      args.concurrency))  # fmt: skip
                run = summarize(before, fleet.engine_counters(), ttfts, seconds)
                run.cpu_ms_per_request = (cpu_seconds(fleet.web.pid) - cpu) * 1000 / len(order)
                runs[f"llmfleet {policy}"] = run
                count = 40 if args.quick else 400
                c1[policy] = p(asyncio.run(latencies_c1(fleet.url, auth, fleet.model, count)), 50)
        # Two web processes, each request to the next: each has its own index, and a prefix
        # new to one goes to its home, the same replica from both (no shared state).
        with Llmfleet("cache_aware", env, work, sizes, "twoweb", webs=2) as fleet:
            before = fleet.engine_counters()
            ttfts, seconds = asyncio.run(send_all(fleet.urls, auth, fleet.model, order,
                                                  args.concurrency))  # fmt: skip
            runs["llmfleet cache_aware, 2 web"] = summarize(
                before, fleet.engine_counters(), ttfts, seconds
            )
        with Llmfleet("cache_aware", env, work, sizes, "uniform") as fleet:
            before = fleet.engine_counters()
            ttfts, seconds = asyncio.run(send_all(fleet.url, auth, fleet.model, uniform,
                                                  args.concurrency))  # fmt: skip
            runs["llmfleet cache_aware, uniform"] = summarize(
                before, fleet.engine_counters(), ttfts, seconds
            )
        routers = ("vllm-router", "vllm-router kv_aware", "sglang-router")
        for name in () if args.no_routers else routers:
            engines = Engines(work, sizes, name.replace(" ", "-"), kv_events="kv_aware" in name)
            port = free_port()
            router = start(router_argv(name, port, engines), os.environ.copy(),
                           work / f"{name.replace(' ', '-')}.log")  # fmt: skip
            try:
                wait_for(lambda: answers(f"http://127.0.0.1:{port}/health"), 120, name)  # noqa: B023
                before = engines.engine_counters()
                ttfts, seconds = asyncio.run(send_all(
                    f"http://127.0.0.1:{port}/v1/chat/completions", {}, Engines.MODEL, order,
                    args.concurrency))  # fmt: skip
                runs[name if "kv_aware" in name else f"{name} cache_aware"] = summarize(
                    before, engines.engine_counters(), ttfts, seconds
                )
            finally:
                stop([router, *engines.processes])
        read_us = model_read_us(work, args.system_words)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(runs, oracle, c1, read_us)


def model_read_us(work: Path, words: int) -> float:
    """What precise routing costs a request to a vLLM replica in the web process, beyond
    cache_aware: a chat (a system prompt of `words` words and a question) rendered with the
    tiny checkpoint's template, tokenized with its tokenizer and its blocks named (µs, the
    median of 7 rounds of 100: the same chat again, as a shared system prompt comes)."""
    from controlplane.gateway.apis import Api
    from controlplane.gateway.tokens import ModelTokenizer
    from nodeagent import tinymodel
    from nodeagent.kvblocks import block_chain, chain_root
    from nodeagent.kvevents import TOKENIZER_FILES

    directory = tinymodel.build(work / "tiny")
    reader = ModelTokenizer.load({name: (directory / name).read_bytes()
                                  for name in TOKENIZER_FILES if (directory / name).exists()})  # fmt: skip
    rng = random.Random(1)  # noqa: S311 (not a secret)
    vocabulary = sorted(set(tinymodel.CORPUS.lower().split()))
    system = " ".join(rng.choice(vocabulary) for _ in range(words))
    body = {"messages": [{"role": "system", "content": system},
                         {"role": "user", "content": "what now?"}]}  # fmt: skip
    rounds = []
    ids: list[int] = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(100):
            ids = reader.ids(Api.CHAT, body, 64 * 1024) or []
            block_chain(ids, 16, chain_root("m"))
        rounds.append((time.perf_counter() - start) * 1e6 / 100)
    assert ids, "the chat was not read"
    print(f"precise, a vLLM replica: a {len(system)}-byte chat read into {len(ids)} tokens "
          f"in {statistics.median(rounds):.0f} µs", flush=True)  # fmt: skip
    return statistics.median(rounds)


def report(runs: dict[str, Run], oracle: float, c1: dict[str, float], read_us: float) -> None:
    print(f"\n{'path':<32} {'hit ratio':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'req/s':>7} "
          f"{'max/mean':>9} {'web CPU ms/req':>15}")  # fmt: skip
    for name, run in runs.items():
        print(f"{name:<32} {run.hit_ratio:9.3f} {run.ttft_p50:9.1f} {run.ttft_p90:9.1f} "
              f"{run.rps:7.1f} {run.imbalance:9.2f} {run.cpu_ms_per_request:15.2f}")  # fmt: skip
    print(f"{'oracle (one cache, 4x as large)':<32} {oracle:9.3f}")
    least, aware = runs["llmfleet least_loaded"], runs["llmfleet cache_aware"]
    vllm, sglang = runs.get("vllm-router cache_aware"), runs.get("sglang-router cache_aware")
    vllm_kv, precise = runs.get("vllm-router kv_aware"), runs["llmfleet precise"]

    def of(run: Run | None, figure: str) -> str:
        if run is None:
            return "na"
        if figure == "hit":
            return f"{run.hit_ratio:.3f}"
        return f"{aware.ttft_p90 / run.ttft_p90:.2f}"  # cache_aware's TTFT p90 against its

    fields = [
        f"hit_oracle={oracle:.3f}",
        f"hit_least_loaded={least.hit_ratio:.3f}",
        f"hit_cache_aware={aware.hit_ratio:.3f}",
        f"hit_precise={precise.hit_ratio:.3f}",
        f"hit_vllm_router={of(vllm, 'hit')}",
        f"hit_vllm_router_kv_aware={of(vllm_kv, 'hit')}",
        f"hit_sglang_router={of(sglang, 'hit')}",
        f"ttft_p90_ratio={of(least, 'ttft')}",
        f"ttft_p90_vs_vllm_router={of(vllm, 'ttft')}",
        f"ttft_p90_vs_sglang_router={of(sglang, 'ttft')}",
        "ttft_p90_precise_vs_vllm_router_kv_aware="
        + ("na" if vllm_kv is None else f"{precise.ttft_p90 / vllm_kv.ttft_p90:.2f}"),
        f"hit_cache_aware_2web={runs['llmfleet cache_aware, 2 web'].hit_ratio:.3f}",
        f"imbalance={runs['llmfleet cache_aware, uniform'].imbalance:.2f}",
        f"imbalance_zipf={aware.imbalance:.2f}",
        f"added_p50_ms={c1['cache_aware'] - c1['least_loaded']:.2f}",
        f"precise_added_p50_ms={c1['precise'] - c1['least_loaded']:.2f}",
        f"precise_model_read_us={read_us:.0f}",
        f"hit_vs_oracle={aware.hit_ratio / oracle:.2f}",
    ]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
