"""The first engine start of a model on a fresh agent in vLLM's compile mode (no
--enforce-eager), without and with the compile cache another agent published.

    .venv/bin/python bench/compilecache.py [--standby-engines 0]

Publishes the tiny checkpoint to a `file://` store, then runs two node agents one after
the other, each with a cache of its own (the first start on a fresh host): agent A
compiles and publishes its compile cache beside the checkpoint; agent B downloads it
before its engine starts. Each agent's standby engine is ready before its load (pass
`--standby-engines 0` for plain starts). Prints the LoadEvent-style timings of both and
ends with `RESULT compile_first_start_s=… compile_cached_start_s=… ratio=…`.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodeagent import tinymodel  # noqa: E402
from nodeagent.store.publish import publish  # noqa: E402
from tests.e2e.agent_process import AgentProcess, engine_python, running_agent  # noqa: E402
from tests.support import wait_for  # noqa: E402

CPU_COMPILE_ARGS = ["--max-model-len", "512", "--dtype", "float32",
                    "--kv-cache-memory-bytes", "64M", "--max-num-seqs", "8"]  # fmt: skip
READY = 'llmfleet_agent_standby_engines{state="ready"}'
PUBLISHED = 'llmfleet_agent_compile_cache_publishes_total{outcome="published"}'


def start_once(agent: AgentProcess, source: str, standbys: str) -> dict[str, object]:
    if standbys != "0":
        wait_for(lambda: agent.metric(READY) >= 1, 600, "the standby engine")
    body = {"model_id": "bench/tiny", "source": source, "engine": {"args": CPU_COMPILE_ARGS}}
    started = time.perf_counter()
    response = agent.post("/load_model", body, timeout=900)
    assert response.status_code == 200, response.text
    timings = dict(response.json()["timings"])
    timings["client_seconds"] = time.perf_counter() - started
    return timings


def wait_published(agent: AgentProcess) -> None:
    wait_for(lambda: agent.metric(PUBLISHED) == 1, 120, "the compile cache's publish")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--standby-engines", default="auto")
    parser.add_argument(
        "--quick", action="store_true",
        help="(CI) the same run, which is already the smallest: two engine starts",
    )  # fmt: skip
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-compile-"))
    tiny = tinymodel.build(work / "tiny")
    source = (work / "store" / "bench" / "tiny").as_uri()
    publish(tiny, source, {}, stream=io.StringIO())
    flags = ("--engine", "vllm", "--engine-python", engine_python(),
             "--standby-engines", args.standby_engines)  # fmt: skip
    results = {}
    # The same cache path on both "hosts": vLLM's compile hash includes the model's path.
    host = work / "host"
    for name in ("first", "cached"):
        if host.exists():
            host.rename(work / "first-host")
        host.mkdir()
        with running_agent(host, *flags) as agent:
            timings = start_once(agent, source, args.standby_engines)
            results[name] = timings
            print(f"{name}: engine start {timings['engine_start_seconds']:.2f} s "
                  f"({timings['engine_start']}; compile cache {timings['compile_cache']}), "
                  f"load {timings['client_seconds']:.2f} s", flush=True)  # fmt: skip
            if name == "first":
                wait_published(agent)
    first = float(results["first"]["engine_start_seconds"])  # type: ignore[arg-type]
    cached = float(results["cached"]["engine_start_seconds"])  # type: ignore[arg-type]
    assert results["cached"]["compile_cache"] == "store", results["cached"]
    print(f"\nRESULT compile_first_start_s={first:.2f} compile_cached_start_s={cached:.2f} "
          f"ratio={cached / first:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
