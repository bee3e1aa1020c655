"""What the gateway adds to an engine's latency: direct, through the agent, through the gateway.

    .venv/bin/python bench/gateway.py [--requests 2000]

Starts a zero-delay sim engine alone, a node agent serving the same sim, and
the control plane (daphne on embedded defaults in a temporary VAR_DIR, with
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
`--no-litellm` skips it.
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
from functools import partial
from pathlib import Path

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
SIM = [
    "--sim-load-seconds",
    "0",
    "--sim-ttft-ms",
    "0",
    "--sim-tpot-ms",
    "0",
    "--sim-max-num-seqs",
    "256",
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start(argv: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT
    )


def answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1).status_code < 500
    except requests.ConnectionError:
        return False


async def measure(
    url: str, headers: dict[str, str], count: int, concurrency: int, body: dict[str, object] = BODY
) -> tuple[list[float], float]:
    """Latencies (ms) of `count` requests at `concurrency`, and the wall seconds."""
    latencies: list[float] = []
    queue = list(range(count))
    async with aiohttp.ClientSession(
        headers=headers, connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def worker() -> None:
            while queue:
                queue.pop()
                started = time.perf_counter()
                async with session.post(url, json=body) as response:
                    await response.read()
                    assert response.status == 200, await response.text()
                latencies.append((time.perf_counter() - started) * 1000)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return latencies, time.perf_counter() - began


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


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]


LITELLM_VENV = ROOT / ".venv-litellm"


def litellm_command() -> Path:
    """LiteLLM's CLI, building its virtual environment first if need be."""
    cli = LITELLM_VENV / "bin" / "litellm"
    if not cli.exists():
        print("building .venv-litellm from requirements/litellm-bench.txt (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(LITELLM_VENV)], check=True)
        subprocess.run(
            [str(LITELLM_VENV / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
             "-r", str(ROOT / "requirements" / "litellm-bench.txt")],
            check=True,
        )  # fmt: skip
    return cli


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--no-litellm", action="store_true", help="skip the LiteLLM comparison")
    args = parser.parse_args()
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
    )
    engine_port, embed_port, agent_port, web_port, litellm_port = (free_port() for _ in range(5))
    processes = []
    litellm = None
    try:
        for model, port, runner in (
            ("bench/sim", engine_port, "generate"),
            ("bench/embed", embed_port, "pooling"),
        ):
            processes.append(start([sys.executable, "-m", "nodeagent.engines.sim", "--model-id", model,
                                    "--port", str(port), "--ttft-ms", "0", "--tpot-ms", "0",
                                    "--max-num-seqs", "256", "--runner", runner], env,
                                   work / f"engine-{runner}.log"))  # fmt: skip
        subprocess.run(
            [sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True
        )
        # The agent runs without a control plane, catalogued by hand: its token is the
        # credential the gateway derives for its row (README: Agent enrolment).
        enrol = (
            "import secrets; from agents import credentials; from agents.models import Agent; "
            "n = secrets.token_hex(32); c = credentials.derive('bench', n); "
            f"Agent.objects.create(agent_id='bench', base_url='http://127.0.0.1:{agent_port}', "
            "credential_nonce=n, credential_fingerprint=credentials.fingerprint(c)); print(c)"
        )
        token = subprocess.run([sys.executable, "manage.py", "shell", "-c", enrol], cwd=ROOT, env=env,
                               check=True, capture_output=True, text=True).stdout.split()[-1]  # fmt: skip
        processes.append(start([sys.executable, "-m", "nodeagent", "--port", str(agent_port), "--token",
                                token, "--engine", "sim", "--cache-dir", str(work / "cache"),
                                "--log-level", "WARNING", *SIM], env, work / "agent.log"))  # fmt: skip
        checkpoint = work / "checkpoint"
        checkpoint.mkdir()
        (checkpoint / "config.json").write_text("{}")
        wait_for(lambda: answers(f"http://127.0.0.1:{agent_port}/healthz"), 30, "the agent")
        import requests

        endpoints = {}
        loads: tuple[tuple[str, list[str]], ...] = (
            ("bench/sim", []),
            ("bench/embed", ["--runner", "pooling"]),
        )
        for model, engine_args in loads:
            endpoints[model] = requests.post(
                f"http://127.0.0.1:{agent_port}/load_model",
                json={"model_id": model, "source": checkpoint.as_uri(), "engine": {"args": engine_args}},
                headers={"Authorization": f"Bearer {token}"}, timeout=30,
            ).json()["inference_endpoint_url"]  # fmt: skip
        setup = (
            "from agents.models import Agent, Model, Placement; from controlplane.gateway.actions import "
            "create_api_key; a = Agent.objects.get(agent_id='bench')\n"
            f"for model_id, kind, url in {[(m, 'embedding' if 'embed' in m else 'generate', u) for m, u in endpoints.items()]!r}:\n"
            "    m = Model.objects.create(model_id=model_id, source='file:///x', kind=kind)\n"
            "    Placement.objects.create(agent=a, model=m, state='READY', cache_level='GPU_RESIDENT', "
            "inference_endpoint_url=url)\n"
            "print(create_api_key('bench')[1])"
        )
        key = subprocess.run([sys.executable, "manage.py", "shell", "-c", setup], cwd=ROOT, env=env,
                             check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]  # fmt: skip
        web = start([sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(web_port),
                     "controlplane.asgi:application"], env, work / "web.log")  # fmt: skip
        processes.append(web)
        wait_for(lambda: answers(f"http://127.0.0.1:{web_port}/healthz"), 30, "daphne")
        for health in (f"http://127.0.0.1:{port}/health" for port in (engine_port, embed_port)):
            wait_for(partial(answers, health), 30, "the engines")
        if not args.no_litellm:
            litellm = start_litellm(engine_port, litellm_port, work)
            processes.append(litellm)
            wait_for(
                lambda: answers(f"http://127.0.0.1:{litellm_port}/health/liveliness"),
                180,
                "LiteLLM",
            )

        agent_auth = {"Authorization": f"Bearer {token}"}
        gateway_auth = {"Authorization": f"Bearer {key}"}
        # Every API direct, through the agent and through the gateway; chat also through LiteLLM.
        paths: dict[
            tuple[str, str], tuple[str, dict[str, str], subprocess.Popen[bytes] | None]
        ] = {}
        for api, (path, body, _) in APIS.items():
            direct_port = embed_port if api == "embeddings" else engine_port
            paths[api, "direct"] = (f"http://127.0.0.1:{direct_port}{path}", {}, None)
            paths[api, "agent"] = (f"{endpoints[str(body['model'])]}{path}", agent_auth, None)
            paths[api, "gateway"] = (f"http://127.0.0.1:{web_port}{path}", gateway_auth, web)
        if litellm is not None:
            paths["chat", "litellm"] = (
                f"http://127.0.0.1:{litellm_port}/v1/chat/completions",
                {},
                litellm,
            )
        results: dict[tuple[str, str], dict[str, float]] = {}
        for (api, name), (url, headers, proxy) in paths.items():
            _, body, streams = APIS[api]
            asyncio.run(measure(url, headers, 200, 8, body))  # warm up
            cpu_before = cpu_seconds(proxy.pid) if proxy else 0.0
            single, _ = asyncio.run(measure(url, headers, args.requests // 4, 1, body))
            many, seconds = asyncio.run(measure(url, headers, args.requests, 32, body))
            cpu = cpu_seconds(proxy.pid) - cpu_before if proxy else float("nan")
            firsts = (
                asyncio.run(first_chunk(url, headers, 200, body)) if streams else [float("nan")]
            )
            results[api, name] = {
                "p50": p(single, 50), "p99": p(single, 99), "rps": len(many) / seconds,
                "ttfc": statistics.median(firsts),
                "cpu_ms": cpu * 1000 / (len(single) + len(many)),
            }  # fmt: skip
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\n{'api':<11} {'path':<8} {'p50 ms c=1':>11} {'p99 ms c=1':>11} {'req/s c=32':>11} {'1st chunk ms':>13} {'proxy CPU ms/req':>17}"
    )
    for (api, name), row in results.items():
        print(
            f"{api:<11} {name:<8} {row['p50']:11.2f} {row['p99']:11.2f} {row['rps']:11.0f} {row['ttfc']:13.2f} {row['cpu_ms']:17.2f}"
        )
    direct, gateway = results["chat", "direct"], results["chat", "gateway"]
    added = gateway["p50"] - direct["p50"]
    litellm_row = results.get(("chat", "litellm"))
    if litellm_row is not None:
        litellm_added = litellm_row["p50"] - direct["p50"]
        print(
            f"\nagainst LiteLLM: added p50 {litellm_added / added:.1f}x lower, "
            f"requests/s {gateway['rps'] / litellm_row['rps']:.1f}x higher (target 3x both)"
        )
        litellm_fields = (
            f"litellm_added_p50_ms={litellm_added:.2f} litellm_rps_c32={litellm_row['rps']:.0f}"
        )
    else:
        litellm_fields = "litellm_added_p50_ms=na litellm_rps_c32=na"
    print(
        f"RESULT gateway_added_p50_ms={added:.2f} "
        f"gateway_added_p99_ms={gateway['p99'] - direct['p99']:.2f} "
        f"stream_ttfc_added_ms={gateway['ttfc'] - direct['ttfc']:.2f} gateway_rps_c32={gateway['rps']:.0f} "
        f"{litellm_fields} "
        + " ".join(
            f"{api}_added_p50_ms={results[api, 'gateway']['p50'] - results[api, 'direct']['p50']:.2f} "
            f"{api}_added_p99_ms={results[api, 'gateway']['p99'] - results[api, 'direct']['p99']:.2f} "
            f"{api}_rps_c32={results[api, 'gateway']['rps']:.0f}"
            for api in APIS
            if api != "chat"
        )
    )


if __name__ == "__main__":
    main()
