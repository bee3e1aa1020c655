"""vLLM's own load generator on real vLLM: through the gateway, and straight to the engine.

    .venv/bin/python bench/realclient.py [--pairs 3] [--prompts 300] [--concurrency 8]
    .venv/bin/python bench/realclient.py --quick

Runs what `make run` runs (`python -m controlplane.fleet`: web, worker, beat and one node
agent with real vLLM on the CPU, embedded defaults in a temporary VAR_DIR), has the fleet
start `llmfleet/tiny` with one request, finds the engine's own port, then runs vLLM's
load generator (`vllm.benchmarks.serve` from `.venv-engine`: random prompts of 32 tokens,
64 out with `--ignore-eos`, text completions) against the gateway (with the fleet's demo
API key) and straight at the engine, alternated `--pairs` times, each path first in turn.
Prints each run's requests/s, TTFT and ITL (p50, p99), the CPU each of the fleet's
processes and the load generator spent per request (read from /proc around each run), then
the medians per path and:

    RESULT gateway_rps=… direct_rps=… cpu_per_request_ratio=… rps_ratio=… itl_p99_added_ms=…
        ttft_p50_added_ms=…

`cpu_per_request_ratio`: the whole machine's CPU per request through the gateway over
straight to the engine. The engine saturates this machine, so it bounds `rps_ratio` without
the runs' noise (direct runs alone vary by a quarter here).

Targets (issue 28): rps_ratio >= 0.95, itl_p99_added_ms <= 5. `--quick` runs one small pair
(what the test suite runs: the fleet's start with real vLLM is most of its minute).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from coldstart import first_token, own_fleet, stop_fleet  # noqa: E402

MODEL = "llmfleet/tiny"
ENGINE_PYTHON = ROOT / ".venv-engine" / "bin" / "python"
LOAD_GENERATOR = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
FIGURES = ("request_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_itl_ms", "p99_itl_ms")


def engine_url(model: str) -> str:
    """The serving engine's own address: the loopback port whose `/v1/models` lists `model`
    without a key (the agent and the gateway want one; a standby engine serves no model)."""
    import requests

    listening = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True)
    ports = sorted({int(port) for port in re.findall(r"127\.0\.0\.1:(\d+)\s", listening.stdout)})
    for port in ports:
        try:
            answer = requests.get(f"http://127.0.0.1:{port}/v1/models", timeout=1)
        except requests.RequestException:
            continue
        if answer.ok and any(entry.get("id") == model for entry in answer.json().get("data", [])):
            return f"http://127.0.0.1:{port}"
    raise SystemExit(f"no engine on this machine lists {model}")


def checkpoint_dir(work: Path) -> Path:
    """The checkpoint the agent serves (its tokenizer is the load generator's)."""
    found = sorted(work.rglob("tokenizer.json"))
    if not found:
        raise SystemExit(f"no tokenizer under {work}")
    return found[0].parent


def generate_load(
    base_url: str, key: str | None, tokenizer: Path, args: argparse.Namespace, out: Path
) -> dict[str, float]:
    """One run of vLLM's load generator; its figures (FIGURES)."""
    argv = [
        str(ENGINE_PYTHON), "-c", LOAD_GENERATOR, "--backend", "openai", "--base-url", base_url,
        "--endpoint", "/v1/completions", "--model", MODEL, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--random-input-len", "32", "--random-output-len", "64",
        "--ignore-eos", "--num-prompts", str(args.prompts), "--max-concurrency",
        str(args.concurrency), "--percentile-metrics", "ttft,itl", "--metric-percentiles",
        "50,99", "--disable-tqdm", "--save-result", "--result-dir", str(out.parent),
        "--result-filename", out.name, "--seed", "0", "--save-detailed",
    ]  # fmt: skip
    if key is not None:
        argv += ["--header", f"Authorization=Bearer {key}"]
    env = {**os.environ, "OPENAI_API_KEY": key or "none", "VLLM_LOGGING_LEVEL": "WARNING"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    if done.returncode or not out.exists():
        raise SystemExit(f"the load generator failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    result = json.loads(out.read_text())
    if result.get("completed") != args.prompts:
        errors = sorted({str(error)[:300] for error in result.get("errors", []) if error})
        raise SystemExit(f"{result.get('completed')} of {args.prompts} requests completed at "
                         f"{base_url}: " + "; ".join(errors[:5]))  # fmt: skip
    return {name: float(result[name]) for name in FIGURES}


# What each of the fleet's processes is: by its name (vLLM names its engine core process),
# else by the module its command line runs (the first that matches).
ROLES = (("VLLM::EngineCor", "engine core"), ("VLLM::Worker", "engine worker"),
         ("-m nodeagent", "agent"),
         ("-m controlplane.web", "web"), ("-m celery", "celery"), ("vllm", "engine api"),
         ("-m controlplane.fleet", "fleet"))  # fmt: skip


def fleet_cpu(root: int) -> dict[str, float]:
    """CPU seconds so far of the fleet's processes (`root` and everything below it), by role;
    a process that ended is not counted, so compare figures of one run."""
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}  # user + system, of each process read
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(pid)
        ticks[pid] = int(fields[11]) + int(fields[12])
    seconds: dict[str, float] = {}
    todo = [root]
    while todo:
        pid = todo.pop()
        todo += children.get(pid, [])
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except OSError:
            continue
        role = next((name for mark, name in ROLES if comm == mark or mark in command), "other")
        seconds[role] = seconds.get(role, 0.0) + ticks.get(pid, 0) / os.sysconf("SC_CLK_TCK")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="one small pair (CI)")
    args = parser.parse_args()
    if args.quick:
        args.pairs, args.prompts, args.concurrency = 1, 16, 4
    work, base, _, fleet = own_fleet("llmfleet-bench-real-", standby=True)
    runs: dict[str, list[dict[str, float]]] = {"gateway": [], "direct": []}
    cpus: dict[str, list[dict[str, float]]] = {"gateway": [], "direct": []}
    try:
        key = (work / "var" / "demo-api-key").read_text().strip()
        print(f"the fleet's first request starts {MODEL} ...", flush=True)
        asyncio.run(first_token(base, key, MODEL))
        direct = engine_url(MODEL)
        tokenizer = checkpoint_dir(work)
        results = Path(tempfile.mkdtemp(prefix="llmfleet-bench-real-results-"))
        paths = {"gateway": (base, key), "direct": (direct, None)}
        print(f"{'run':<5}{'path':<9}{'req/s':>8}{'p50 TTFT':>10}{'p99 TTFT':>10}"
              f"{'p50 ITL':>9}{'p99 ITL':>9}  (ms)")  # fmt: skip
        for pair in range(args.pairs):
            order = ["gateway", "direct"] if pair % 2 == 0 else ["direct", "gateway"]
            for name in order:
                url, path_key = paths[name]
                cpu_before = fleet_cpu(fleet.pid)
                client_before = resource.getrusage(resource.RUSAGE_CHILDREN)
                figures = generate_load(url, path_key, tokenizer, args,
                                        results / f"{pair}-{name}.json")  # fmt: skip
                client_after = resource.getrusage(resource.RUSAGE_CHILDREN)
                cpu = {role: spent - cpu_before.get(role, 0.0)
                       for role, spent in fleet_cpu(fleet.pid).items()}  # fmt: skip
                cpu["load generator"] = (client_after.ru_utime + client_after.ru_stime
                                         - client_before.ru_utime - client_before.ru_stime)  # fmt: skip
                cpus[name].append(cpu)
                runs[name].append(figures)
                print(f"{pair + 1:<5}{name:<9}{figures['request_throughput']:8.1f}"
                      f"{figures['p50_ttft_ms']:10.1f}{figures['p99_ttft_ms']:10.1f}"
                      f"{figures['p50_itl_ms']:9.1f}{figures['p99_itl_ms']:9.1f}",
                      flush=True)  # fmt: skip
    finally:
        stop_fleet(fleet)

    def median(path: str, figure: str) -> float:
        return statistics.median(run[figure] for run in runs[path])

    # Where the machine's CPU went, per request: what the gateway's path costs besides the
    # gateway and the agent shows as more of the engine's or the load generator's.
    roles = sorted({role for path in cpus.values() for run in path for role in run})
    print(
        f"\nCPU ms per request (medians of the runs): {'':<4}" + "".join(f"{r:>15}" for r in roles)
    )
    for path, path_runs in cpus.items():
        per_request = [
            {role: run.get(role, 0.0) * 1000 / args.prompts for role in roles} for run in path_runs
        ]
        print(f"{path:<45}" + "".join(
            f"{statistics.median(run[role] for run in per_request):15.2f}" for role in roles))  # fmt: skip

    gateway_rps, direct_rps = (
        median("gateway", "request_throughput"),
        median("direct", "request_throughput"),
    )
    # The machine's CPU per request, everything counted: on a machine the engine saturates,
    # requests/s goes as its inverse, without the runs' noise.
    totals = {path: statistics.median(sum(run.values()) for run in path_runs)
              for path, path_runs in cpus.items()}  # fmt: skip
    print(
        f"\nRESULT gateway_rps={gateway_rps:.2f} direct_rps={direct_rps:.2f} "
        f"cpu_per_request_ratio={totals['gateway'] / totals['direct']:.3f} "
        f"rps_ratio={gateway_rps / direct_rps:.3f} "
        f"itl_p99_added_ms={median('gateway', 'p99_itl_ms') - median('direct', 'p99_itl_ms'):.2f} "
        f"ttft_p50_added_ms={median('gateway', 'p50_ttft_ms') - median('direct', 'p50_ttft_ms'):.2f}"
    )


if __name__ == "__main__":
    main()
