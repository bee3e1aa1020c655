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
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import free_port, wait_for  # noqa: E402

BODY = {"model": "bench/sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
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
# The code before the warm-path work (issue 28), which the streaming case compares against.
BASELINE_REF = "b7d33a1"
STREAM_TOKENS = 256
STREAM_BODY: dict[str, object] = BODY | {"max_tokens": STREAM_TOKENS, "stream": True}
SIM = [
    "--sim-load-seconds",
    "0",
    "--sim-ttft-ms",
    "0",
    "--sim-tpot-ms",
    "TPOT",
    "--sim-max-num-seqs",
    "256",
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1).status_code < 500
    except requests.ConnectionError:
        return False


async def closed_loop(
    headers: dict[str, str],
    count: int,
    concurrency: int,
    one: Callable[[aiohttp.ClientSession], Awaitable[None]],
) -> float:
    """`count` calls of `one` by `concurrency` workers, each starting the next as its last
    ends; the wall seconds."""
    queue = list(range(count))
    async with aiohttp.ClientSession(
        headers=headers, connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def worker() -> None:
            while queue:
                queue.pop()
                await one(session)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began


async def measure(
    url: str, headers: dict[str, str], count: int, concurrency: int, body: dict[str, object] = BODY
) -> tuple[list[float], float]:
    """Latencies (ms) of `count` requests at `concurrency`, and the wall seconds."""
    latencies: list[float] = []

    async def one(session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        async with session.post(url, json=body) as response:
            await response.read()
            assert response.status == 200, await response.text()
        latencies.append((time.perf_counter() - started) * 1000)

    seconds = await closed_loop(headers, count, concurrency, one)
    return latencies, seconds


async def first_chunk(
    url: str, headers: dict[str, str], count: int, body: dict[str, object] = BODY
) -> list[float]:
    times = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url, json=body | {"stream": True}) as response:
                assert response.status == 200, await response.text()
                await response.content.readany()
                times.append((time.perf_counter() - started) * 1000)
                await response.read()
    return times


async def stream_load(
    url: str, headers: dict[str, str], count: int, concurrency: int, body: dict[str, object]
) -> float:
    """Stream `count` answers of STREAM_TOKENS tokens at `concurrency`; the wall seconds. Each
    answer is read as it comes, and must end with `data: [DONE]`."""

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url, json=body) as response:
            assert response.status == 200, await response.text()
            tail = b""
            async for chunk in response.content.iter_any():
                tail = (tail + chunk)[-32:]
            assert tail.rstrip().endswith(b"data: [DONE]"), tail

    return await closed_loop(headers, count, concurrency, one)


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


LITELLM_VENV = ROOT / ".venv-litellm"
VLLM_ROUTER_VENV = ROOT / ".venv-vllm-router"


def peer_program(venv: Path, requirements: str, program: str) -> Path:
    """A peer's program in its own virtual environment, built from requirements/<requirements>
    the first time (a few seconds to a few minutes), so that its pins never meet ours."""
    path = venv / "bin" / program
    if not path.exists():
        print(f"building {venv.name} from requirements/{requirements} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
             "-r", str(ROOT / "requirements" / requirements)],
            check=True,
        )  # fmt: skip
    return path


def litellm_command() -> Path:
    """LiteLLM's CLI, building its virtual environment first if need be."""
    return peer_program(LITELLM_VENV, "litellm-bench.txt", "litellm")


def vllm_router_command() -> Path:
    """vllm-router's CLI, building its virtual environment first if need be."""
    return peer_program(VLLM_ROUTER_VENV, "vllm-router-bench.txt", "vllm-router")


def start_vllm_router(engine_port: int, port: int, work: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))}
    return start([str(vllm_router_command()), "--host", "127.0.0.1", "--port", str(port),
                  "--worker-urls", f"http://127.0.0.1:{engine_port}", "--policy", "round_robin",
                  "--log-level", "warning"], env, work / "vllm-router.log")  # fmt: skip


def start_litellm(engine_port: int, port: int, work: Path) -> subprocess.Popen[bytes]:
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench/sim\n"
        "    litellm_params:\n"
        "      model: openai/bench/sim\n"
        f"      api_base: http://127.0.0.1:{engine_port}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))}
    env.update(LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False")
    return start([str(litellm_command()), "--config", str(config), "--host", "127.0.0.1",
                  "--port", str(port), "--num_workers", "1"], env, work / "litellm.log")  # fmt: skip


def start(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(processes: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """Terminate them all, then wait for each (killed past `timeout`)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def manage(code: str, env: dict[str, str]) -> str:
    """The last line `code` prints, run in `manage.py shell` against the benchmark's database."""
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return out.strip().splitlines()[-1]


class AgentProc:
    """A node agent with the sim engine, run from one code tree, catalogued by hand in the
    benchmark's database: its token is the credential the gateway derives for its row
    (README: Agent enrolment)."""

    def __init__(self, name: str, tree: Path, env: dict[str, str], work: Path, tpot_ms: float):
        self.name, self.tree, self.env, self.work, self.tpot_ms = name, tree, env, work, tpot_ms
        self.port = free_port()
        self.endpoints: dict[str, str] = {}

    def start(self) -> subprocess.Popen[bytes]:
        self.token = manage(
            "import secrets; from agents import credentials; from agents.models import Agent; "
            f"n = secrets.token_hex(32); c = credentials.derive('{self.name}', n); "
            f"Agent.objects.create(agent_id='{self.name}', "
            f"base_url='http://127.0.0.1:{self.port}', credential_nonce=n, "
            "credential_fingerprint=credentials.fingerprint(c)); print(c)",
            self.env,
        )
        self.process = start([sys.executable, "-m", "nodeagent", "--port",
                              str(self.port), "--token", self.token, "--engine", "sim",
                              "--cache-dir", str(self.work / f"cache-{self.name}"),
                              "--log-level", "WARNING",
                              *(str(self.tpot_ms) if arg == "TPOT" else arg for arg in SIM)],
                             self.env, self.work / f"agent-{self.name}.log", self.tree)  # fmt: skip
        wait_for(lambda: answers(f"http://127.0.0.1:{self.port}/healthz"), 30, "an agent")
        return self.process

    def load(self, models: dict[str, list[str]], checkpoint: Path) -> None:
        import requests

        for model, engine_args in models.items():
            self.endpoints[model] = requests.post(
                f"http://127.0.0.1:{self.port}/load_model",
                json={"model_id": model, "source": checkpoint.as_uri(),
                      "engine": {"args": engine_args}},
                headers={"Authorization": f"Bearer {self.token}"}, timeout=30,
            ).json()["inference_endpoint_url"]  # fmt: skip
        rows = [(m, "embedding" if "embed" in m else "generate", u)
                for m, u in self.endpoints.items()]  # fmt: skip
        manage(
            "from agents.models import Agent, Model, Placement\n"
            f"a = Agent.objects.get(agent_id='{self.name}')\n"
            f"for model_id, kind, url in {rows!r}:\n"
            "    m = Model.objects.create(model_id=model_id, source='file:///x', kind=kind)\n"
            "    Placement.objects.create(agent=a, model=m, state='READY', "
            "cache_level='GPU_RESIDENT', inference_endpoint_url=url)\n"
            "print('ok')",
            self.env,
        )

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Stack:
    """Node agents and a gateway run from one code tree: this checkout, or the
    baseline's worktree. All share the benchmark's database; each agent has its own row and
    serves models of its own. `plain` serves the non-streaming cases (engines that answer at
    once); `stream` the streaming case (engines with a time per token)."""

    def __init__(
        self, name: str, tree: Path, env: dict[str, str], work: Path, tpot_ms: float
    ) -> None:
        self.name, self.tree, self.env, self.work = name, tree, env, work
        self.web_port = free_port()
        self.plain = AgentProc(name, tree, env, work, 0.0)
        self.stream = AgentProc(f"{name}-stream", tree, env, work, tpot_ms)

    def start_web(self, server: str) -> subprocess.Popen[bytes]:
        argv = (
            ["-m", "daphne", "-b", "127.0.0.1", "-p", str(self.web_port),
             "controlplane.asgi:application"]
            if server == "daphne"
            else ["-m", "controlplane.web", "--host", "127.0.0.1", "--port", str(self.web_port)]
        )  # fmt: skip
        self.web = start([sys.executable, *argv], self.env, self.work / f"web-{self.name}.log",
                         self.tree)  # fmt: skip
        wait_for(lambda: answers(f"http://127.0.0.1:{self.web_port}/healthz"), 30, "the web server")
        return self.web


def baseline_tree(ref: str, work: Path) -> Path:
    """A worktree of `ref` to run the baseline's agent and gateway from (removed at the end)."""
    tree = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), ref], cwd=ROOT,
                   check=True)  # fmt: skip
    return tree


def main() -> None:
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
    engine_port, embed_port, stream_port, stream_uv_port, litellm_port, router_port, floor_port = (
        free_port() for _ in range(7)
    )
    processes: list[subprocess.Popen[bytes]] = []
    peers: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    tree: Path | None = None
    stacks = {"ours": Stack("bench", ROOT, env, work, args.tpot_ms)}
    try:
        # The stream engine twice: on asyncio's loop and on uvloop, the loops this code's agent
        # and the baseline's run their in-process sim engines on: each one's own CPU is what
        # its agent's figure holds besides the relay.
        for model, port, runner, tpot, loop in (
            ("bench/sim", engine_port, "generate", 0.0, "asyncio"),
            ("bench/embed", embed_port, "pooling", 0.0, "asyncio"),
            ("bench/stream", stream_uv_port, "generate", args.tpot_ms, "uvloop"),
            ("bench/stream", stream_port, "generate", args.tpot_ms, "asyncio"),
        ):
            processes.append(start([sys.executable, "-m", "nodeagent.engines.sim", "--model-id", model,
                                    "--port", str(port), "--ttft-ms", "0", "--tpot-ms", str(tpot),
                                    "--max-num-seqs", "256", "--runner", runner,
                                    "--event-loop", loop], env,
                                   work / f"engine-{model.rsplit('/', 1)[1]}-{loop}.log"))  # fmt: skip
        stream_engine_uv, stream_engine = processes[-2:]
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True
        )
        if not args.no_baseline:
            tree = baseline_tree(args.baseline, work)
            stacks["baseline"] = Stack("bench-base", tree, env, work, args.tpot_ms)
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
            processes.append(stack.start_web(args.server if name == "ours" else "daphne"))
        for port in (engine_port, embed_port, stream_port, stream_uv_port):
            wait_for(partial(answers, f"http://127.0.0.1:{port}/health"), 30, "the engines")
        if not args.no_litellm:
            litellm = start_litellm(engine_port, litellm_port, work)
            processes.append(litellm)
            peers["litellm"] = (f"http://127.0.0.1:{litellm_port}", litellm)
        if not args.no_vllm_router:
            router = start_vllm_router(engine_port, router_port, work)
            processes.append(router)
            peers["vllm-router"] = (f"http://127.0.0.1:{router_port}", router)
        # The least a Python hop adds (bench/floor_proxy.py); --quick runs it too, so it cannot rot.
        floor = start([sys.executable, str(ROOT / "bench" / "floor_proxy.py"), "--port",
                       str(floor_port), "--upstream", f"http://127.0.0.1:{engine_port}"],
                      env, work / "floor-proxy.log")  # fmt: skip
        processes.append(floor)
        peers["python floor"] = (f"http://127.0.0.1:{floor_port}", floor)
        for name, (base, _) in peers.items():
            health = "/health/liveliness" if name == "litellm" else "/health"
            wait_for(partial(answers, f"{base}{health}"), 180, name)

        gateway_auth = {"Authorization": f"Bearer {key}"}
        # Every API direct, through the agent and through the gateway; chat also through the
        # peers. Each path: (url, headers, the proxy whose CPU is read, the agent's too).
        Path_ = tuple[str, dict[str, str], "subprocess.Popen[bytes] | None",
                      "subprocess.Popen[bytes] | None"]  # fmt: skip
        paths: dict[tuple[str, str], Path_] = {}
        for api, (path, body, _) in APIS.items():
            direct_port = embed_port if api == "embeddings" else engine_port
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
        results: dict[tuple[str, str], dict[str, float]] = {}
        for (api, name), (url, headers, proxy, _) in paths.items():
            _, body, streaming = APIS[api]
            asyncio.run(measure(url, headers, max(args.requests // 10, 8), 8, body))  # warm up
            cpu_before = cpu_seconds(proxy.pid) if proxy else 0.0
            single, _ = asyncio.run(measure(url, headers, args.requests // 4, 1, body))
            many, seconds = asyncio.run(measure(url, headers, args.requests, 32, body))
            cpu = cpu_seconds(proxy.pid) - cpu_before if proxy else float("nan")
            count = 200 if not args.quick else 10
            firsts = (
                asyncio.run(first_chunk(url, headers, count, body)) if streaming else [float("nan")]
            )
            results[api, name] = {
                "p50": p(single, 50), "p99": p(single, 99), "rps": len(many) / seconds,
                "ttfc": statistics.median(firsts),
                "cpu_ms": cpu * 1000 / (len(single) + len(many)),
            }  # fmt: skip

        # Streaming: the engines with a time per token, straight, through the agent and
        # through the gateway (this code's and the baseline's), alternated round by round.
        chat = "/v1/chat/completions"
        stream_paths: dict[str, tuple[str, dict[str, str], Any, Any, str]] = {
            # Its "proxy" CPU is the sim engine's own: what the agent's figure holds besides
            # the relay, since the agent runs its sim engine in its own process.
            "direct": (
                f"http://127.0.0.1:{stream_port}{chat}",
                {},
                stream_engine,
                None,
                "bench/stream",
            ),
            "direct (uvloop)": (
                f"http://127.0.0.1:{stream_uv_port}{chat}",
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
        streams: dict[tuple[str, int], list[dict[str, float]]] = {}
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
        for _ in range(args.rounds):
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


nan = float("nan")


async def profiled(
    processes: dict[str, subprocess.Popen[bytes]],
    seconds: float,
    load: Callable[[], Awaitable[object]],
    keep: Path | None = None,
) -> dict[str, list[str]]:
    """Sample `processes` with py-spy for `seconds` while `load` runs (repeated until then);
    each one's busiest functions, by samples with that function on top (self) and anywhere on
    the stack (total)."""
    spy = Path(sys.executable).with_name("py-spy")
    out = Path(tempfile.mkdtemp(prefix="llmfleet-spy-"))
    spies = [
        await asyncio.create_subprocess_exec(
            str(spy),
            "record",
            "--pid",
            str(process.pid),
            "--rate",
            "1000",
            "--format",
            "raw",
            "--duration",
            str(int(seconds)),
            "--nonblocking",
            "-o",
            str(out / name),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for name, process in processes.items()
    ]
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        await load()
    for process in spies:
        await process.wait()
    found = {name: summarize(out / name) for name in processes}
    if keep is not None:  # py-spy's collapsed stacks, for a flame graph (e.g. inferno, speedscope)
        os.makedirs(keep, exist_ok=True)
        for name in processes:
            shutil.copy(out / name, keep / f"{name.split(' ')[0]}.folded")
    shutil.rmtree(out, ignore_errors=True)
    return found


def summarize(raw: Path, top: int = 22) -> list[str]:
    """The busiest functions of py-spy's raw (collapsed) stacks."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" for frame in stack.split(";")]  # fmt: skip
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            anywhere[frame] += samples
    if not total:
        return ["  (no samples)"]
    lines = [f"  {'self %':>7} {'total %':>8}  function (file)"]
    for frame, samples in own.most_common(top):
        lines.append(
            f"  {100 * samples / total:7.1f} {100 * anywhere[frame] / total:8.1f}  {frame}"
        )
    return lines


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
