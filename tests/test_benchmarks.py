"""Every benchmark under bench/ still runs: its `--quick` mode (tiny sizes, no peers) to its
RESULT line. A benchmark that stops working fails CI here; its figures come from full runs
(bench/README.md)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
# Each benchmark and how long its quick mode may take (those with real vLLM start a fleet).
QUICK_SECONDS = {
    "adapters": 900,
    "batch": 300,
    "coldstart": 1200,
    "compilecache": 900,
    "download": 600,
    "fairness": 300,
    "faults": 900,
    "fleet": 300,
    "gateway": 300,
    "history": 300,
    "realclient": 900,
    "routing": 300,
    "routing_replay": 120,
}


def test_every_benchmark_has_a_quick_run_here() -> None:
    # Not benchmarks but parts of them, each run by the benchmarks that use it: stores.py is
    # download.py's; floor_proxy.py, otlp_sink.py and gateway_paths.py are gateway.py's;
    # routing_paths.py and routing_traffic.py routing.py's; loadgen.py, peers.py, profiling.py
    # and stack.py are shared by gateway.py, batch.py, fairness.py and routing.py.
    parts = {"stores", "floor_proxy", "otlp_sink", "gateway_paths", "loadgen", "peers",
             "profiling", "stack", "routing_paths", "routing_traffic"}  # fmt: skip
    scripts = {path.stem for path in BENCH.glob("*.py") if path.stem not in parts}
    assert scripts == set(QUICK_SECONDS)


@pytest.mark.e2e
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("name", sorted(QUICK_SECONDS))
def test_the_benchmark_runs_quickly_to_its_result(name: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "VAR_DIR"}}
    if name == "faults":
        # It runs the fault suite's pytest itself: on databases of its own, never this
        # session's test database.
        env.update(
            DATABASE_URL="postgres://postgres@127.0.0.1:5432/llmfleet_bench_quick",
            REDIS_URL="redis://127.0.0.1:6379/13",
            VAR_DIR=str(tmp_path / "var"),
        )
    done = subprocess.run(
        [sys.executable, str(BENCH / f"{name}.py"), "--quick"], cwd=ROOT, env=env,
        capture_output=True, text=True, timeout=QUICK_SECONDS[name],
    )  # fmt: skip
    said = done.stdout[-6000:] + done.stderr[-6000:]
    assert done.returncode == 0, said
    assert any(line.startswith("RESULT ") for line in done.stdout.splitlines()), said
