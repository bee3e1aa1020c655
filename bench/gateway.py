"""What the gateway adds to an engine's latency: direct, through the agent, through the gateway.

    .venv/bin/python bench/gateway.py [--requests 2000] [--baseline REF] [--quick]

Starts a zero-delay sim engine alone, a node agent serving the same sim, and
the control plane (its web process on embedded defaults in a temporary VAR_DIR, with
one READY placement on that agent), then measures in the same run:
non-streaming chat completions at concurrency 1 and 32, and the time to the
first streamed chunk at concurrency 1, with p50/p99, requests/s and the
gateway process's CPU milliseconds per request. The same figures are taken
for `/v1/responses` (same engine) and `/v1/embeddings` (a second sim engine
with the pooling runner, behind the same agent), direct and through the
gateway, so each path the gateway adds is covered. The load comes from this
process (aiohttp), on the same 2 cores. The same is measured through a LiteLLM
proxy (`litellm --config`, `openai/` provider) in front of the same engine; it
runs from its own virtual environment, `.venv-litellm`, which this script builds
from requirements/litellm-bench.txt the first time (a few minutes);
`--no-litellm` skips it. vllm-router (the Rust router of vllm-project/router) is
measured the same way in front of the same engine, from `.venv-vllm-router`
(requirements/vllm-router-bench.txt); `--no-vllm-router` skips it.

The streaming case: a 256-token stream per request (chat, `max_tokens` 256) at
concurrency 1 and 32, straight to a sim engine with a time per token
(`--tpot-ms`, 2 by default: each token its own SSE event and write, as a real
engine's are), through a second agent serving such an engine, and through the
gateway to that agent: tokens per second, and the CPU microseconds per relayed
chunk (one SSE event, one token) of the gateway and of the agent, read from
/proc while that path streams. The agent runs its sim engine in its own process,
so its figure holds the engine's work too: the direct paths' rows give the sim
engine's own, on asyncio's loop (RESULT `cpu_us_per_chunk_sim_engine`, the
baseline agent's loop) and on uvloop (`..._uvloop`, this code's agent's loop).
`cpu_per_chunk_vs_baseline` compares gateway + agent, sim engines included;
`relay_cpu_per_chunk_vs_baseline` the relay alone, each agent less its sim
engine's own. `--baseline REF` (the
code before the warm-path work by default) runs a second gateway and streaming
agent from that commit (a git worktree, the same virtual environment and
database, a model of their own) and measures them the same way, round by round
alternated with this code's, its gateway under daphne as it was then. This
code's gateway is the web process `make run` serves (`python -m
controlplane.web`: uvicorn, httptools, uvloop); `--server daphne` serves the
same application under daphne instead. `--profile SECONDS`
samples the gateway and the agent with py-spy while the gateway streams and
prints where their CPU goes.

Tracing's cost: a second web process and agent of this code with tracing on (OTLP/HTTP to
`bench/otlp_sink.py`, a collector stand-in that discards every export) serve the same chat
request; RESULT `tracing_overhead_p50_ms` is its added p50 at concurrency 1 less the untraced
gateway's, measured in the same run.

`--quick` runs every case at tiny sizes without the peers or the baseline, in a
few seconds: what the test suite runs so that a benchmark that stops working
fails CI. The figures come from full runs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import requests
from gateway_paths import (
    APIS,
    STREAM_BODY,
    STREAM_TOKENS,
    TRACED,
    TRACED_MODEL,
    Ports,
    Proc,
    RequestPath,
    StreamPath,
    measure_requests,
    measure_streams,
    request_paths,
    streaming_paths,
)
from loadgen import measure, stream_load
from peers import start_litellm, start_vllm_router
from profiling import profiled
from stack import ROOT, Stack, answers, baseline_tree, manage, start, stop

from tests.support import wait_for

# The code before the warm-path work (issue 28), which the streaming case compares against.
BASELINE_REF = "b7d33a1"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3, help="streaming rounds, alternated")
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM comparison")
    parser.add_argument("--no-vllm-router", action="store_true", help="skip vllm-router")
    parser.add_argument("--baseline", default=BASELINE_REF, help="commit to compare against")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, no peers (CI)")
    parser.add_argument(
        "--server", default="uvicorn", choices=["uvicorn", "daphne"],
        help="what serves this code's gateway: `python -m controlplane.web` (uvicorn, what "
        "`make run` serves) or daphne (the baseline's always runs under daphne, as it did)",
    )  # fmt: skip
    parser.add_argument(
        "--tpot-ms", type=float, default=2.0,
        help="the sim engines' time per output token: each token its own SSE event and write, "
        "as a real engine's are (0 lets a stream's tokens pile up into fewer, larger writes)",
    )  # fmt: skip
    parser.add_argument(
        "--profile", metavar="SECONDS", type=float, default=0,
        help="sample the gateway and the agent with py-spy while the gateway streams (c=32)",
    )  # fmt: skip
    parser.add_argument(
        "--profile-load", choices=["stream", "requests"], default="stream",
        help="what --profile samples: streams at c=32, or non-streaming requests at c=1",
    )  # fmt: skip
    parser.add_argument(
        "--profile-out", metavar="DIR", type=Path,
        help="keep --profile's stacks there (py-spy's collapsed format: gateway.folded, ...)",
    )  # fmt: skip
    args = parser.parse_args()
    if args.quick:
        args.requests, args.rounds = 40, 1
        args.no_litellm = args.no_vllm_router = args.no_baseline = True
    return args


def main() -> None:
    args = parse_args()
    stream_counts = {1: 1, 32: 32} if args.quick else {1: 6, 32: 96}
    work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-gw-"))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "AGENT_TOKEN", "SECRET_KEY"}
    }
    env.update(
        VAR_DIR=str(work / "var"),
        AGENT_TOKEN="bench-token",
        SECRET_KEY="bench",
        LOG_LEVEL="WARNING",
        PYTHONPATH="",
    )
    ports = Ports()
    processes: list[Proc] = []
    tree: Path | None = None
    stacks = {"ours": Stack("bench", ROOT, env, work, args.tpot_ms)}
    try:
        stream_engine_uv, stream_engine = start_engines(ports, args.tpot_ms, env, work, processes)
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True
        )
        if not args.no_baseline:
            tree = baseline_tree(args.baseline, work)
            stacks["baseline"] = Stack("bench-base", tree, env, work, args.tpot_ms)
        key = start_stacks(stacks, args.server, env, work, processes)
        traced = start_traced(ports, args.server, env, work, processes)
        for port in (ports.engine, ports.embed, ports.stream, ports.stream_uv):
            wait_for(partial(answers, f"http://127.0.0.1:{port}/health"), 30, "the engines")
        peers = start_peers(args, ports, env, work, processes)

        gateway_auth = {"Authorization": f"Bearer {key}"}
        paths = request_paths(stacks["ours"], ports, peers, gateway_auth)
        paths[TRACED, "gateway"] = (f"http://127.0.0.1:{traced.web_port}/v1/chat/completions",
                                    gateway_auth, traced.web, traced.plain.process)  # fmt: skip
        results = measure_requests(paths, args.requests, args.quick)
        # Spans leave in batches (every 5 s, or 512 at a time): the traced path did export.
        sink = f"http://127.0.0.1:{ports.sink}/count"
        wait_for(lambda: requests.get(sink, timeout=5).json()["exports"] > 0, 30, "an export")
        stream_paths = streaming_paths(stacks, ports, gateway_auth, stream_engine, stream_engine_uv)
        profiles = profile(args, stacks["ours"], paths, stream_paths)
        streams = measure_streams(stream_paths, args.rounds, stream_counts)
    finally:
        stop(processes)
        if tree is not None:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT,
                           check=False)  # fmt: skip
        shutil.rmtree(work, ignore_errors=True)
    report(results, streams)
    for what, lines in profiles.items():
        print(f"\n{what}: where the CPU goes while the gateway streams (py-spy, share of samples)")
        print("\n".join(lines))


def start_engines(
    ports: Ports, tpot_ms: float, env: dict[str, str], work: Path, processes: list[Proc]
) -> tuple[Proc, Proc]:
    """The standalone sim engines: chat and embeddings answering at once, and the stream engine
    twice: on asyncio's loop and on uvloop, the loops this code's agent and the baseline's run
    their in-process sim engines on: each one's own CPU is what its agent's figure holds besides
    the relay. The two stream engines' processes (uvloop's, asyncio's)."""
    for model, port, runner, tpot, loop in (
        ("bench/sim", ports.engine, "generate", 0.0, "asyncio"),
        ("bench/embed", ports.embed, "pooling", 0.0, "asyncio"),
        ("bench/stream", ports.stream_uv, "generate", tpot_ms, "uvloop"),
        ("bench/stream", ports.stream, "generate", tpot_ms, "asyncio"),
    ):
        processes.append(start([sys.executable, "-m", "nodeagent.engines.sim", "--model-id", model,
                                "--port", str(port), "--ttft-ms", "0", "--tpot-ms", str(tpot),
                                "--max-num-seqs", "256", "--runner", runner,
                                "--event-loop", loop], env,
                               work / f"engine-{model.rsplit('/', 1)[1]}-{loop}.log"))  # fmt: skip
    stream_engine_uv, stream_engine = processes[-2:]
    return stream_engine_uv, stream_engine


def start_stacks(
    stacks: dict[str, Stack], server: str, env: dict[str, str], work: Path, processes: list[Proc]
) -> str:
    """Each stack's agents, serving their models, and its web process; the API key's secret."""
    checkpoint = work / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    ours = stacks["ours"]
    processes.append(ours.plain.start())
    ours.plain.load({"bench/sim": [], "bench/embed": ["--runner", "pooling"]}, checkpoint)
    for name, stack in stacks.items():
        processes.append(stack.stream.start())
        stack.stream.load({"bench/stream" + ("" if name == "ours" else "-base"): []},
                          checkpoint)  # fmt: skip
    key = manage("from controlplane.gateway.actions import create_api_key; "
                 "print(create_api_key('bench')[1])", env)  # fmt: skip
    for name, stack in stacks.items():
        processes.append(stack.start_web(server if name == "ours" else "daphne"))
    return key


def start_traced(
    ports: Ports, server: str, env: dict[str, str], work: Path, processes: list[Proc]
) -> Stack:
    """A web process and an agent of this code with tracing on, every span exported to a sink
    (bench/otlp_sink.py) that discards it: the same path as `gateway`, traced."""
    processes.append(start([sys.executable, str(ROOT / "bench" / "otlp_sink.py"), "--port",
                            str(ports.sink)], env, work / "otlp-sink.log"))  # fmt: skip
    wait_for(partial(answers, f"http://127.0.0.1:{ports.sink}/health"), 30, "the OTLP sink")
    traced_env = env | {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{ports.sink}"}
    traced = Stack("bench-traced", ROOT, traced_env, work, 0.0)
    processes.append(traced.plain.start())
    checkpoint = work / "checkpoint"
    traced.plain.load({TRACED_MODEL: []}, checkpoint)
    processes.append(traced.start_web(server))
    return traced


def start_peers(
    args: argparse.Namespace, ports: Ports, env: dict[str, str], work: Path, processes: list[Proc]
) -> dict[str, tuple[str, Proc]]:
    """The proxies in front of the chat engine measured beside the gateway, once they answer:
    LiteLLM and vllm-router unless skipped, and the Python floor always."""
    peers: dict[str, tuple[str, Proc]] = {}
    if not args.no_litellm:
        litellm = start_litellm(ports.engine, ports.litellm, work)
        processes.append(litellm)
        peers["litellm"] = (f"http://127.0.0.1:{ports.litellm}", litellm)
    if not args.no_vllm_router:
        router = start_vllm_router(ports.engine, ports.router, work)
        processes.append(router)
        peers["vllm-router"] = (f"http://127.0.0.1:{ports.router}", router)
    # The least a Python hop adds (bench/floor_proxy.py); --quick runs it too, so it cannot rot.
    floor = start([sys.executable, str(ROOT / "bench" / "floor_proxy.py"), "--port",
                   str(ports.floor), "--upstream", f"http://127.0.0.1:{ports.engine}"],
                  env, work / "floor-proxy.log")  # fmt: skip
    processes.append(floor)
    peers["python floor"] = (f"http://127.0.0.1:{ports.floor}", floor)
    for name, (base, _) in peers.items():
        health = "/health/liveliness" if name == "litellm" else "/health"
        wait_for(partial(answers, f"{base}{health}"), 180, name)
    return peers


def profile(
    args: argparse.Namespace,
    ours: Stack,
    paths: dict[tuple[str, str], RequestPath],
    stream_paths: dict[str, StreamPath],
) -> dict[str, list[str]]:
    """With --profile: where this code's gateway and agent spend their CPU, while the gateway
    streams or (--profile-load requests) answers one request at a time."""
    profiles: dict[str, list[str]] = {}
    if args.profile and args.profile_load == "stream":
        url, headers, _, _, model = stream_paths["gateway"]
        profiles = asyncio.run(profiled(
            {f"gateway ({args.server})": ours.web,
             "agent (and its in-process sim engine)": ours.stream.process},
            args.profile,
            partial(stream_load, url, headers, 64, 32, STREAM_BODY | {"model": model}),
            args.profile_out,
        ))  # fmt: skip
    elif args.profile:  # one request at a time: what a request's added latency is made of
        url, headers, _, _ = paths["chat", "gateway"]
        profiles = asyncio.run(profiled(
            {f"gateway ({args.server})": ours.web, "agent": ours.plain.process},
            args.profile, partial(measure, url, headers, 200, 1), args.profile_out,
        ))  # fmt: skip
    return profiles


def median_of(rows: list[dict[str, float]], field: str) -> float:
    return statistics.median(row[field] for row in rows)


def report(
    results: dict[tuple[str, str], dict[str, float]],
    streams: dict[tuple[str, int], list[dict[str, float]]],
) -> None:
    print(
        f"\n{'api':<11} {'path':<12} {'p50 ms c=1':>11} {'p99 ms c=1':>11} {'req/s c=32':>11} {'1st chunk ms':>13} {'proxy CPU ms/req':>17}"
    )
    for (api, name), row in results.items():
        print(
            f"{api:<11} {name:<12} {row['p50']:11.2f} {row['p99']:11.2f} {row['rps']:11.0f} {row['ttfc']:13.2f} {row['cpu_ms']:17.2f}"
        )
    print(f"\nstreaming, {STREAM_TOKENS} tokens per answer (medians of the rounds; CPU per chunk "
          "read while that path streams)")  # fmt: skip
    print(
        f"{'path':<17} {'conc':>5} {'tokens/s':>10} {'proxy CPU us/chunk':>19} {'agent CPU us/chunk':>19}"
    )
    for (name, concurrency), rows in streams.items():
        print(f"{name:<17} {concurrency:>5} {median_of(rows, 'tok_s'):10.0f} "
              f"{median_of(rows, 'proxy_us'):19.1f} {median_of(rows, 'agent_us'):19.1f}")  # fmt: skip

    direct, gateway = results["chat", "direct"], results["chat", "gateway"]
    added = gateway["p50"] - direct["p50"]
    fields = [
        f"gateway_added_p50_ms={added:.2f}",
        f"gateway_added_p99_ms={gateway['p99'] - direct['p99']:.2f}",
        f"stream_ttfc_added_ms={gateway['ttfc'] - direct['ttfc']:.2f}",
        f"gateway_rps_c32={gateway['rps']:.0f}",
    ]
    for peer in ("litellm", "vllm-router", "python floor"):
        peer_row = results.get(("chat", peer))
        label = peer.replace("-", "_").replace(" ", "_")
        if peer_row is None:
            fields += [f"{label}_added_p50_ms=na", f"{label}_rps_c32=na"]
            continue
        peer_added = peer_row["p50"] - direct["p50"]
        print(f"\nagainst {peer}: its added p50 {peer_added:.2f} ms against ours {added:.2f} ms "
              f"({peer_added / added:.1f}x), requests/s ours/its "
              f"{gateway['rps'] / peer_row['rps']:.1f}x")  # fmt: skip
        fields += [
            f"{label}_added_p50_ms={peer_added:.2f}",
            f"{label}_rps_c32={peer_row['rps']:.0f}",
        ]
        if peer == "vllm-router":  # the target: within 3x of its added latency
            fields.append(f"vs_vllm_router_added_p50={added / peer_added:.2f}")
    traced = results[TRACED, "gateway"]
    fields.append(f"tracing_overhead_p50_ms={traced['p50'] - gateway['p50']:.2f}")
    for api in APIS:
        if api == "chat":
            continue
        ours, base = results[api, "gateway"], results[api, "direct"]
        fields += [
            f"{api}_added_p50_ms={ours['p50'] - base['p50']:.2f}",
            f"{api}_added_p99_ms={ours['p99'] - base['p99']:.2f}",
            f"{api}_rps_c32={ours['rps']:.0f}",
        ]
    ratio = median_of(streams["gateway", 32], "tok_s") / median_of(streams["direct", 32], "tok_s")
    gateway_us = median_of(streams["gateway", 32], "proxy_us")
    agent_us = median_of(streams["gateway", 32], "agent_us")
    engine_us = median_of(streams["direct", 32], "proxy_us")
    engine_uv_us = median_of(streams["direct (uvloop)", 32], "proxy_us")
    fields += [
        f"stream_tok_s_ratio={ratio:.2f}",
        f"stream_tok_s_ratio_c1="
        f"{median_of(streams['gateway', 1], 'tok_s') / median_of(streams['direct', 1], 'tok_s'):.2f}",
        f"cpu_us_per_chunk_gateway={gateway_us:.1f}",
        f"cpu_us_per_chunk_agent={agent_us:.1f}",
        f"cpu_us_per_chunk_sim_engine={engine_us:.1f}",
        f"cpu_us_per_chunk_sim_engine_uvloop={engine_uv_us:.1f}",
    ]
    if ("baseline gateway", 32) in streams:
        base_gateway = median_of(streams["baseline gateway", 32], "proxy_us")
        base_agent = median_of(streams["baseline gateway", 32], "agent_us")
        fields += [
            f"baseline_cpu_us_per_chunk_gateway={base_gateway:.1f}",
            f"baseline_cpu_us_per_chunk_agent={base_agent:.1f}",
            f"cpu_per_chunk_vs_baseline={(gateway_us + agent_us) / (base_gateway + base_agent):.2f}",
            # The relay alone: each agent less its in-process sim engine's own CPU (this code's
            # agent runs on uvloop, the baseline's on asyncio's loop).
            "relay_cpu_per_chunk_vs_baseline="
            f"{(gateway_us + agent_us - engine_uv_us) / (base_gateway + base_agent - engine_us):.2f}",
        ]
    print("RESULT " + " ".join(fields))


if __name__ == "__main__":
    main()
