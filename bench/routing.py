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
- TTFT p50 and p90 inside the engines (their own `vllm:time_to_first_token_seconds`: the
  wait for a seat, and the prefill of what the cache lacks), which routing decides; and as
  the client saw it, which adds every hop in front of the engines on this shared machine;
- requests/s;
- max/mean of the prompt tokens each engine took, and of those it prefilled (did not hold);
- the web process's CPU per request.

Also reported:

- the oracle: the hit ratio of one cache as large as all four together, with every request
  in order, which no routing can beat;
- `imbalance`: cache_aware's max/mean load on a uniform workload (every prompt equally
  popular);
- `added_p50_ms`: what cache_aware adds to least_loaded's latency at concurrency 1 (a web
  process under each policy in front of the same agents, in ten interleaved rounds).

`--quick` runs tiny sizes without the routers, so that the test suite runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loadgen import p
from routing_paths import Engines, Llmfleet, router_argv
from routing_traffic import (
    Run,
    Sizes,
    latencies_c1,
    oracle_hit_ratio,
    send_all,
    summarize,
    workload,
)
from stack import ROOT, answers, cpu_seconds, manage, start, stop

from tests.support import free_port, wait_for


def parse_args() -> argparse.Namespace:
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
    return args


def main() -> None:
    args = parse_args()
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
    try:
        runs, c1 = run_policies(args, sizes, order, env, work, auth)
        runs |= run_cache_aware_variants(args, sizes, order, uniform, env, work, auth)
        if not args.no_routers:
            runs |= run_routers(args, sizes, order, work)
        read_us = model_read_us(work, args.system_words)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(runs, oracle, c1, read_us)


def run_policies(
    args: argparse.Namespace,
    sizes: Sizes,
    order: list[list[dict[str, str]]],
    env: dict[str, str],
    work: Path,
    auth: dict[str, str],
) -> tuple[dict[str, Run], dict[str, float]]:
    """llmfleet under each routing policy: each one's run, and its latency p50 at concurrency 1
    (non-streaming requests one at a time)."""
    runs: dict[str, Run] = {}
    c1: dict[str, float] = {}  # measured on the last fleet, precise's, with every policy
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
            if policy == "precise":
                c1 = latencies_by_policy(args, fleet, auth)
    return runs, c1


def latencies_by_policy(args: argparse.Namespace, fleet: Llmfleet,
                        auth: dict[str, str]) -> dict[str, float]:  # fmt: skip
    """Each policy's latency p50 at concurrency 1: a web process under each in front of the
    same agents and engines, measured in interleaved rounds. This machine's speed drifts
    over minutes, and where its two cores put each process differs from fleet to fleet:
    policies measured on fleets of their own, one after another, differed by up to 0.3 ms
    with the same routing cost. Each web process is new: none carries the run before."""
    urls = {
        policy: fleet.web_under(policy) for policy in ("least_loaded", "cache_aware", "precise")
    }
    fleet.follow_feeds(auth, [urls["precise"]])
    latencies: dict[str, list[float]] = {policy: [] for policy in urls}
    rounds, count = (2, 20) if args.quick else (10, 40)
    for _ in range(rounds):
        for policy, url in urls.items():
            latencies[policy] += asyncio.run(latencies_c1(url, auth, fleet.model, count))
    return {policy: p(values, 50) for policy, values in latencies.items()}


def run_cache_aware_variants(
    args: argparse.Namespace,
    sizes: Sizes,
    order: list[list[dict[str, str]]],
    uniform: list[list[dict[str, str]]],
    env: dict[str, str],
    work: Path,
    auth: dict[str, str],
) -> dict[str, Run]:
    """cache_aware behind two web processes, and on the uniform workload (its imbalance)."""
    runs: dict[str, Run] = {}
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
    return runs


def run_routers(
    args: argparse.Namespace, sizes: Sizes, order: list[list[dict[str, str]]], work: Path
) -> dict[str, Run]:
    """vllm-router (cache_aware and kv_aware) and sglang-router, each on fresh engines."""
    runs: dict[str, Run] = {}
    for name in ("vllm-router", "vllm-router kv_aware", "sglang-router"):
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
    return runs


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
    print(
        "\nTTFT: inside the engines (a seat, the prefill); client: as the "
        "client saw it, every hop in front of the engines included (ms)"
    )
    print(f"\n{'path':<32} {'hit ratio':>9} {'TTFT p50':>9} {'TTFT p90':>9} {'client p50':>10} "
          f"{'client p90':>10} {'req/s':>7} {'max/mean':>9} {'prefill max/mean':>16} "
          f"{'web CPU ms/req':>15}")  # fmt: skip
    for name, run in runs.items():
        print(f"{name:<32} {run.hit_ratio:9.3f} {run.ttft_p50:9.2f} {run.ttft_p90:9.2f} "
              f"{run.client_p50:10.1f} {run.client_p90:10.1f} {run.rps:7.1f} "
              f"{run.imbalance:9.2f} {run.prefill_imbalance:16.2f} "
              f"{run.cpu_ms_per_request:15.2f}")  # fmt: skip
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
        f"prefill_imbalance_zipf={aware.prefill_imbalance:.2f}",
        f"added_p50_ms={c1['cache_aware'] - c1['least_loaded']:.2f}",
        f"precise_added_p50_ms={c1['precise'] - c1['least_loaded']:.2f}",
        f"precise_model_read_us={read_us:.0f}",
        f"hit_vs_oracle={aware.hit_ratio / oracle:.2f}",
    ]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
