"""The paths bench/gateway.py measures and how: every API direct, through the agent and through
the gateway (chat also through the peers), request by request; the streaming engines straight,
through the agent and through the gateway, stream by stream."""

from __future__ import annotations

import asyncio
import statistics
import subprocess
from dataclasses import dataclass, field
from typing import Any

from loadgen import BODY, first_chunk, measure, p, stream_load
from stack import Stack, cpu_seconds

from tests.support import free_port

# The other POST APIs, each with the body a client would send: (path, body, streams).
APIS: dict[str, tuple[str, dict[str, object], bool]] = {
    "chat": ("/v1/chat/completions", BODY, True),
    "responses": (
        "/v1/responses",
        {"model": "bench/sim", "input": "hi", "max_output_tokens": 4},
        True,
    ),
    "embeddings": ("/v1/embeddings", {"model": "bench/embed", "input": "hi"}, False),
}
# Chat through the gateway with tracing on (its web process and agent export every span to
# bench/otlp_sink.py): a model of its own, on an agent of its own.
TRACED = "chat traced"
TRACED_MODEL = "bench/sim-traced"
STREAM_TOKENS = 256
STREAM_BODY: dict[str, object] = BODY | {"max_tokens": STREAM_TOKENS, "stream": True}

Proc = subprocess.Popen[bytes]
# A non-streaming path: (url, headers, the proxy whose CPU is read, the agent's too).
RequestPath = tuple[str, dict[str, str], Proc | None, Proc | None]
# A streaming path: the same, and the model it streams.
StreamPath = tuple[str, dict[str, str], Any, Any, str]


@dataclass
class Ports:
    """The standalone engines' ports, and the peers'."""

    engine: int = field(default_factory=free_port)
    embed: int = field(default_factory=free_port)
    stream: int = field(default_factory=free_port)
    stream_uv: int = field(default_factory=free_port)
    litellm: int = field(default_factory=free_port)
    router: int = field(default_factory=free_port)
    floor: int = field(default_factory=free_port)
    sink: int = field(default_factory=free_port)


def request_paths(
    ours: Stack, ports: Ports, peers: dict[str, tuple[str, Proc]], gateway_auth: dict[str, str]
) -> dict[tuple[str, str], RequestPath]:
    """Every API direct, through the agent and through the gateway; chat also through the
    peers."""
    paths: dict[tuple[str, str], RequestPath] = {}
    for api, (path, body, _) in APIS.items():
        direct_port = ports.embed if api == "embeddings" else ports.engine
        paths[api, "direct"] = (f"http://127.0.0.1:{direct_port}{path}", {}, None, None)
        paths[api, "agent"] = (
            f"{ours.plain.endpoints[str(body['model'])]}{path}", ours.plain.auth,
            ours.plain.process, None,
        )  # fmt: skip
        paths[api, "gateway"] = (
            f"http://127.0.0.1:{ours.web_port}{path}", gateway_auth, ours.web,
            ours.plain.process,
        )  # fmt: skip
    for name, (base, process) in peers.items():
        paths["chat", name] = (f"{base}/v1/chat/completions", {}, process, None)
    return paths


def measure_requests(
    paths: dict[tuple[str, str], RequestPath], requests: int, quick: bool
) -> dict[tuple[str, str], dict[str, float]]:
    """Each path's latency at concurrency 1, requests/s at 32, time to the first streamed chunk
    and its proxy's CPU per request.

    The latencies at concurrency 1 are taken in rounds, a slice of each path's requests per
    round, so that what the machine does meanwhile (these are shared cores, whose speed
    drifts over minutes) falls on every path alike: the comparisons the RESULT line makes
    (gateway against vllm-router and the floor) are of paths measured side by side."""
    bodies = {}
    for key, (url, headers, _, _) in paths.items():
        api = key[0]
        _, body, _ = APIS["chat" if api == TRACED else api]
        bodies[key] = body | {"model": TRACED_MODEL} if api == TRACED else body
        asyncio.run(measure(url, headers, max(requests // 10, 8), 8, bodies[key]))  # warm up
    rounds = 2 if quick else 10
    single: dict[tuple[str, str], list[float]] = {key: [] for key in paths}
    cpu: dict[tuple[str, str], float] = dict.fromkeys(paths, 0.0)
    for _ in range(rounds):
        for key, (url, headers, proxy, _) in paths.items():
            before = cpu_seconds(proxy.pid) if proxy else 0.0
            latencies, _ = asyncio.run(
                measure(url, headers, max(requests // 4 // rounds, 1), 1, bodies[key])
            )
            single[key] += latencies
            cpu[key] += cpu_seconds(proxy.pid) - before if proxy else float("nan")
    results: dict[tuple[str, str], dict[str, float]] = {}
    for key, (url, headers, proxy, _) in paths.items():
        streaming = APIS["chat" if key[0] == TRACED else key[0]][2]
        cpu_before = cpu_seconds(proxy.pid) if proxy else 0.0
        many, seconds = asyncio.run(measure(url, headers, requests, 32, bodies[key]))
        cpu[key] += cpu_seconds(proxy.pid) - cpu_before if proxy else float("nan")
        count = 200 if not quick else 10
        firsts = (
            asyncio.run(first_chunk(url, headers, count, bodies[key]))
            if streaming
            else [float("nan")]
        )
        results[key] = {
            "p50": p(single[key], 50), "p99": p(single[key], 99), "rps": len(many) / seconds,
            "ttfc": statistics.median(firsts),
            "cpu_ms": cpu[key] * 1000 / (len(single[key]) + len(many)),
        }  # fmt: skip
    return results


def streaming_paths(
    stacks: dict[str, Stack],
    ports: Ports,
    gateway_auth: dict[str, str],
    stream_engine: Proc,
    stream_engine_uv: Proc,
) -> dict[str, StreamPath]:
    """The engines with a time per token, straight, through the agent and through the gateway
    (this code's and the baseline's)."""
    chat = "/v1/chat/completions"
    stream_paths: dict[str, StreamPath] = {
        # Its "proxy" CPU is the sim engine's own: what the agent's figure holds besides
        # the relay, since the agent runs its sim engine in its own process.
        "direct": (
            f"http://127.0.0.1:{ports.stream}{chat}",
            {},
            stream_engine,
            None,
            "bench/stream",
        ),
        "direct (uvloop)": (
            f"http://127.0.0.1:{ports.stream_uv}{chat}",
            {},
            stream_engine_uv,
            None,
            "bench/stream",
        ),
    }
    for name, stack in stacks.items():
        label = "" if name == "ours" else "baseline "
        model = "bench/stream" + ("" if name == "ours" else "-base")
        stream_paths[f"{label}agent"] = (
            f"{stack.stream.endpoints[model]}{chat}", stack.stream.auth,
            stack.stream.process, None, model,
        )  # fmt: skip
        stream_paths[f"{label}gateway"] = (
            f"http://127.0.0.1:{stack.web_port}{chat}", gateway_auth, stack.web,
            stack.stream.process, model,
        )  # fmt: skip
    return stream_paths


def measure_streams(
    stream_paths: dict[str, StreamPath], rounds: int, stream_counts: dict[int, int]
) -> dict[tuple[str, int], list[dict[str, float]]]:
    """Each streaming path's tokens/s and CPU per chunk, the paths alternated round by round."""
    streams: dict[tuple[str, int], list[dict[str, float]]] = {}
    for _ in range(rounds):
        for name, (url, headers, proxy, agent, model) in stream_paths.items():
            body = STREAM_BODY | {"model": model}
            asyncio.run(stream_load(url, headers, 4, 4, body))  # warm up
            for concurrency, count in stream_counts.items():
                before = [cpu_seconds(x.pid) if x else 0.0 for x in (proxy, agent)]
                seconds = asyncio.run(stream_load(url, headers, count, concurrency, body))
                after = [cpu_seconds(x.pid) if x else 0.0 for x in (proxy, agent)]
                chunks = count * STREAM_TOKENS
                streams.setdefault((name, concurrency), []).append({
                    "tok_s": chunks / seconds,
                    "proxy_us": (after[0] - before[0]) * 1e6 / chunks if proxy else nan,
                    "agent_us": (after[1] - before[1]) * 1e6 / chunks if agent else nan,
                })  # fmt: skip
    return streams


nan = float("nan")
