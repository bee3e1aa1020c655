"""The fault suite as a report: every case of tests/e2e/faults.py, one after another.

    .venv/bin/python bench/faults.py [-k EXPRESSION]

Runs tests/e2e/test_faults.py under pytest (so against the same PostgreSQL, Redis, Azurite,
haproxy and vLLM as `make test`; run `make test` once first to install them), gathers each
case's report and prints them side by side with what a client sees during each fault, then:

    RESULT faults=<n> survived=<n> failed_while_faulted=<n> failed_after_heal=<n> stuck=<n>
           worst_recovery_s=<x> network_cases=<n> network_failed_after_heal=<n>
           network_stuck=<n> network_worst_converge_s=<x> delay_loss_flaps=<n>

Targets: survived = faults, failed_after_heal = 0, stuck = 0, and for engine SIGKILL with
another READY replica failed_while_faulted = 0. The network cases (an agent in a network
namespace behind a link the suite cuts, delays and makes lossy: root only) also converge
within two heartbeat intervals of the heal (no model above max_replicas, the agent answering
again), and the delayed, lossy link flips the agent's state not once (delay_loss_flaps=0). A case's recovery is the time from its heal
until a client was served again (held requests of a cold start included). The baseline of
each case is its own traffic before the fault: it must have no failure at all (a failure
before the fault counts in failed_after_heal, as a failure while nothing was faulted).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What `make test` sets (Makefile, TEST_ENV), unless the environment says otherwise.
TEST_ENV = {
    "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/llmfleet",
    "REDIS_URL": "redis://127.0.0.1:6379/15",
    "SECRET_KEY": "tests-only-secret-key",
    "AGENT_TOKEN": "tests-only-agent-token",
    "VAR_DIR": str(ROOT / "var" / "test"),
    "AGENT_ENGINE_PYTHON": str(ROOT / ".venv-engine" / "bin" / "python"),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-k", default="", help="run only the cases pytest's -k selects")
    parser.add_argument("--quick", action="store_true", help="one case, engine_sigkill (CI)")
    options = parser.parse_args()
    if options.quick:
        options.k = "engine_sigkill"
    report_path = Path(tempfile.mkdtemp(prefix="llmfleet-faults-")) / "reports.jsonl"
    env = {**TEST_ENV, **os.environ, "FAULTS_REPORT": str(report_path)}
    argv = [sys.executable, "-m", "pytest", "tests/e2e/test_faults.py", "-p", "no:cacheprovider",
            "-q", "-s", *(["-k", options.k] if options.k else [])]  # fmt: skip
    print("running:", " ".join(argv[2:]), flush=True)
    pytest_run = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True)
    reports = (
        [json.loads(line) for line in report_path.read_text().splitlines()]
        if (report_path.exists())
        else []
    )
    if not reports:
        print(pytest_run.stdout[-4000:], pytest_run.stderr[-4000:])
        return 1
    print()
    print("| fault | sent | failed while faulted | failed after heal | stuck | recovery s "
          "| converged s | verdicts | ok |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for r in reports:
        converged = f"{r['converge_s']:.1f}" if r["converge_s"] >= 0 else "-"
        print(f"| {r['name']} | {r['sent']} | {r['failed_while_faulted']} | "
              f"{r['failed_after_heal']} | {r['stuck']} | {r['recovery_s']:.1f} | "
              f"{converged} | {r['flaps']} | {'yes' if r['survived'] else 'NO'} |")  # fmt: skip
    print()
    for r in reports:
        print(f"- {r['name']}: {r['why']}")
        for error in r["errors"]:
            print(f"    seen: {error}")
    survived = sum(r["survived"] for r in reports)
    network = [r for r in reports if r["name"].startswith("network_")]
    print(
        f"\nRESULT faults={len(reports)} survived={survived} "
        f"failed_while_faulted={sum(r['failed_while_faulted'] for r in reports)} "
        f"failed_after_heal={sum(r['failed_after_heal'] for r in reports)} "
        f"stuck={sum(r['stuck'] for r in reports)} "
        f"worst_recovery_s={max(r['recovery_s'] for r in reports):.1f} "
        f"network_cases={len(network)} network_failed_after_heal="
        f"{sum(r['failed_after_heal'] for r in network)} "
        f"network_stuck={sum(r['stuck'] for r in network)} "
        f"network_worst_converge_s={max((r['converge_s'] for r in network), default=0):.1f} "
        f"delay_loss_flaps={sum(r['flaps'] for r in network if r['name'] == 'network_delay_loss')}"
    )
    return 0 if survived == len(reports) else 1


if __name__ == "__main__":
    sys.exit(main())
