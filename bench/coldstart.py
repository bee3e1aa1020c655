"""Cold starts with real vLLM on the CPU: plain starts against standby engines, phase by phase,
and 50 concurrent cold requests.

    .venv/bin/python bench/coldstart.py

Runs what `make run` runs (`python -m controlplane.fleet`: web, worker, beat and
one node agent with vLLM, embedded defaults in a temporary VAR_DIR, the tiny
model published into the local store) twice on the same VAR_DIR, so the same
checkpoint comes from the agent's local cache: first with `AGENT_STANDBY_ENGINES=0`
(every engine starts plainly), then with the default standby engine. In each:

1. the fleet's first cold request for `llmfleet/tiny` (in the second fleet, what
   `make run`'s first request does: it must be a standby start);
2. STARTS more cold requests, each after the engine was stopped (NVME_CACHED) and,
   with standbys, once the next standby is ready: the LoadEvent's engine start
   and the client's first-token time, medians of each.

Then, on the standby fleet: the last cold request split into queue, download,
engine start and first token (the control plane's overhead is everything but
download and engine start), a warm request as the baseline, and 50 concurrent
requests for a second cold model (how many loads, how many failed).

Ends with `RESULT plain_engine_start_s=… standby_engine_start_s=… standby_ratio=…
cold_ttft_plain_s=… cold_ttft_standby_s=… control_plane_overhead_s=…
loads_for_50_concurrent=… failed=…`. Targets: standby_ratio ≤ 0.2, overhead ≤ 0.5 s,
exactly one load, none failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERHEAD_TARGET_S = 0.5
RATIO_TARGET = 0.2
# --quick (what the test suite runs) sets BENCH_QUICK for the modes' processes: one start
# from the local cache each, and 5 concurrent cold requests instead of 50.
QUICK = os.environ.get("BENCH_QUICK") == "1"
STARTS = 1 if QUICK else 3
BURST = 5 if QUICK else 50
READY = 'llmfleet_agent_standby_engines{state="ready"}'
PROMPT = [{"role": "user", "content": "Hello!"}]


async def first_token(base: str, key: str, model: str) -> tuple[float, str]:
    """Seconds to the first content token of a streamed chat completion, and the text."""
    body = {"model": model, "messages": PROMPT, "max_tokens": 8, "stream": True,
            "ignore_eos": True}  # fmt: skip
    started = time.perf_counter()
    first = None
    text = []
    timeout = aiohttp.ClientTimeout(total=600)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.post(
            f"{base}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as response,
    ):
        assert response.status == 200, await response.text()
        async for line in response.content:
            if not line.startswith(b"data: {"):
                continue
            delta = json.loads(line[6:])["choices"][0]["delta"].get("content")
            if delta:
                first = first or time.perf_counter()
                text.append(delta)
    assert first is not None, "no token came back"
    return first - started, "".join(text)


async def burst(base: str, key: str, model: str, count: int) -> list[bool]:
    body = {"model": model, "messages": PROMPT, "max_tokens": 4}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:

        async def one() -> bool:
            async with session.post(
                f"{base}/v1/chat/completions", json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as response:  # fmt: skip
                if response.status != 200:
                    print(f"  failed: {response.status} {await response.text()}")
                    return False
                answer = await response.json()
                return bool(answer["choices"][0]["message"]["content"] is not None)

        return list(await asyncio.gather(*(one() for _ in range(count))))


def start_fleet(
    work: Path, port: int, agent_port: int, standby: bool, log_path: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "AGENT_TOKEN"}}  # fmt: skip
    env.update(VAR_DIR=str(work / "var"), WEB_PORT=str(port), FLEET_AGENT="vllm",
               FLEET_AGENT_PORT=str(agent_port))  # fmt: skip
    if not standby:
        env["AGENT_STANDBY_ENGINES"] = "0"
    print(f"starting the fleet ({'standby engines' if standby else 'plain starts only'}), "
          f"log in {log_path}")  # fmt: skip
    with log_path.open("wb") as log:
        fleet = subprocess.Popen(
            [sys.executable, "-m", "controlplane.fleet"], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    from tests.support import wait_for

    wait_for(lambda: b"fleet: ready" in log_path.read_bytes(), 300, "the fleet")
    return fleet


def stop_fleet(fleet: subprocess.Popen[bytes]) -> None:
    fleet.send_signal(signal.SIGINT)
    try:
        fleet.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(fleet.pid, signal.SIGKILL)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--mode":
        run_mode(sys.argv[2] == "standby")
        return
    if sys.argv[1:] == ["--quick"]:
        os.environ["BENCH_QUICK"] = "1"
    elif sys.argv[1:]:
        raise SystemExit("usage: bench/coldstart.py [--quick]")
    # Each mode in a process of its own, with a fleet and VAR_DIR of its own (Django is set
    # up once per process); the checkpoint is the same bytes (tinymodel is deterministic).
    results: dict[str, dict[str, Any]] = {}
    for mode in ("plain", "standby"):
        with subprocess.Popen([sys.executable, __file__, "--mode", mode], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True) as child:  # fmt: skip
            assert child.stdout is not None
            for line in child.stdout:  # shown as it comes: a mode takes minutes
                if line.startswith("MODE "):
                    results[mode] = json.loads(line[5:])
                else:
                    print(line, end="", flush=True)
        if child.returncode or mode not in results:
            raise SystemExit(f"the {mode} run failed (status {child.returncode})")
    plain, standby = results["plain"], results["standby"]
    ratio = standby["start_s"] / plain["start_s"]
    print()
    print(f"{'median of ' + str(STARTS) + ' starts from the local cache':<48}"
          f"{'plain':>10}{'standby':>10}")  # fmt: skip
    print(f"{'  engine start (s)':<48}{plain['start_s']:>10.2f}{standby['start_s']:>10.2f}"
          f"   ratio {ratio:.3f} (target <= {RATIO_TARGET})")  # fmt: skip
    print(f"{'  cold time to first token (s)':<48}{plain['ttft_s']:>10.2f}"
          f"{standby['ttft_s']:>10.2f}")  # fmt: skip
    print(
        f"{'  the fleet first request (s; it downloads)':<48}{plain['first_ttft']:>10.2f}"
        f"{standby['first_ttft']:>10.2f}   (standby fleet: {standby['first_start']} start)"
    )
    print(
        f"\nRESULT plain_engine_start_s={plain['start_s']:.2f} "
        f"standby_engine_start_s={standby['start_s']:.2f} standby_ratio={ratio:.3f} "
        f"cold_ttft_plain_s={plain['ttft_s']:.2f} cold_ttft_standby_s={standby['ttft_s']:.2f} "
        f"control_plane_overhead_s={standby['overhead_s']:.3f} "
        f"loads_for_50_concurrent={standby['loads']} failed={standby['failed']}"
    )


def own_fleet(prefix: str, standby: bool) -> tuple[Path, str, str, subprocess.Popen[bytes]]:
    """`make run`'s fleet in a new VAR_DIR, this process set up to read its database: the
    work directory, the web and agent URLs, and the fleet's process."""
    from tests.support import free_port

    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.environ.update(VAR_DIR=str(work / "var"), DJANGO_SETTINGS_MODULE="controlplane.settings")
    for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "AGENT_TOKEN"):
        os.environ.pop(name, None)
    port, agent_port = free_port(), free_port()
    fleet = start_fleet(work, port, agent_port, standby, work / "fleet.log")
    return work, f"http://127.0.0.1:{port}", f"http://127.0.0.1:{agent_port}", fleet


def run_mode(standby: bool) -> None:
    work, base, agent_url, fleet = own_fleet("llmfleet-bench-cold-", standby)
    try:
        key = (work / "var" / "demo-api-key").read_text().strip()
        mode = measure_mode(base, key, agent_url, standby)
        figures = {"start_s": mode.start_s, "ttft_s": mode.ttft_s,
                   "first_ttft": mode.first_ttft, "first_start": mode.first_start}  # fmt: skip
        if standby:
            figures.update(summary(base, key, mode))
        print("MODE " + json.dumps(figures), flush=True)
    finally:
        stop_fleet(fleet)


@dataclass
class Mode:
    first_ttft: float  # the fleet's first request: for the standby fleet, `make run`'s
    first_start: str
    starts: list[float]
    ttfts: list[float]

    @property
    def start_s(self) -> float:
        return statistics.median(self.starts)

    @property
    def ttft_s(self) -> float:
        return statistics.median(self.ttfts)


def measure_mode(base: str, key: str, agent_url: str, standby: bool) -> Mode:
    """The fleet's first cold request, then STARTS cold requests from the local cache, each
    after its engine was stopped (and, with standbys, once the next standby is ready)."""
    import django

    django.setup()  # once: each mode runs in a process of its own
    from django.conf import settings

    from agents.actions import unload
    from agents.choices import CacheLevel, LoadEventKind
    from agents.models import LoadEvent, Placement
    from tests.e2e.agent_process import agent_metric
    from tests.support import wait_for

    def ready_standby() -> None:
        if standby:
            token = settings.AGENT_TOKEN
            wait_for(lambda: agent_metric(agent_url, token, READY) >= 1, 300, "a standby engine")

    def cold() -> tuple[float, LoadEvent]:
        ttft, _ = asyncio.run(first_token(base, key, "llmfleet/tiny"))
        wait_for(lambda: latest().first_token_seconds is not None, 30, "the load's record")
        return ttft, latest()

    def latest() -> LoadEvent:
        return LoadEvent.objects.filter(kind=LoadEventKind.LOAD,
                                        model__model_id="llmfleet/tiny").latest("queued_at")  # fmt: skip

    mode = "standby" if standby else "plain"
    print(f"{mode}: the fleet's first cold request for llmfleet/tiny ...")
    first_ttft, first = cold()
    print(f"  first token after {first_ttft:.2f} s; engine start {first.engine_start}"
          f"{': ' + first.engine_start_note if first.engine_start_note else ''}")  # fmt: skip
    starts, ttfts = [], []
    for number in range(STARTS):
        placement = Placement.objects.get(model__model_id="llmfleet/tiny")
        unload(placement, CacheLevel.NVME_CACHED)
        stopped = Placement.objects.filter(pk=placement.pk, cache_level=CacheLevel.NVME_CACHED)
        wait_for(stopped.exists, 120, "the unload")
        ready_standby()
        ttft, load = cold()
        assert load.engine_start == mode, (load.engine_start, load.engine_start_note)
        starts.append(load.engine_start_seconds or 0.0)
        ttfts.append(ttft)
        print(f"  start {number + 1} ({load.engine_start}): engine {starts[-1]:.2f} s, "
              f"first token {ttft:.2f} s")  # fmt: skip
    return Mode(first_ttft, first.engine_start, starts, ttfts)


def summary(base: str, key: str, standby: Mode) -> dict[str, float]:
    """Phases of a standby cold start, the overhead, and 50 concurrent cold requests."""
    from agents.actions import register_catalog_model
    from agents.choices import LoadEventKind
    from agents.models import LoadEvent, Model

    load = LoadEvent.objects.filter(kind=LoadEventKind.LOAD,
                                    model__model_id="llmfleet/tiny").latest("queued_at")  # fmt: skip
    cold_ttft = standby.ttfts[-1]
    warm = sorted(asyncio.run(first_token(base, key, "llmfleet/tiny"))[0] for _ in range(5))
    warm_ttft = warm[len(warm) // 2]
    download = load.download_seconds or 0.0
    engine = load.engine_start_seconds or 0.0
    overhead = cold_ttft - download - engine
    rest = load.total_seconds or 0.0
    print()
    print(f"{'phase of the last standby cold request':<48}{'seconds':>10}")
    print(f"{'  queued (until the worker took the load)':<48}{load.queue_seconds or 0:>10.3f}")
    print(f"{'  download (agent; local cache)':<48}{download:>10.3f}")
    print(f"{'  engine start (agent; standby)':<48}{engine:>10.3f}")
    agent_other = rest - (load.queue_seconds or 0) - download - engine
    print(f"{'  rest of the load (agent, task, database)':<48}{agent_other:>10.3f}")
    print(f"{'  ready -> first answer (LoadEvent)':<48}{load.first_token_seconds or 0:>10.3f}")
    print(f"{'cold time to first token (client)':<48}{cold_ttft:>10.3f}")
    print(f"{'warm time to first token (client, baseline)':<48}{warm_ttft:>10.3f}")
    print(f"{'control plane overhead (cold - download - start)':<48}{overhead:>10.3f}"
          f"   target {OVERHEAD_TARGET_S} s, ratio {overhead / OVERHEAD_TARGET_S:.2f}")  # fmt: skip
    model = Model.objects.get(model_id="llmfleet/tiny")
    register_catalog_model(
        "bench/tiny-b", model.source, size_bytes=model.size_bytes, engine_args=model.engine_args
    )
    print(f"\n{BURST} concurrent requests for the cold bench/tiny-b ...")
    started = time.perf_counter()
    outcomes = asyncio.run(burst(base, key, "bench/tiny-b", BURST))
    elapsed = time.perf_counter() - started
    loads = LoadEvent.objects.filter(model__model_id="bench/tiny-b", kind=LoadEventKind.LOAD)
    failed = outcomes.count(False)
    print(f"  all answered after {elapsed:.1f} s: {loads.count()} load(s), {failed} failed")
    return {"overhead_s": overhead, "loads": loads.count(), "failed": failed}


if __name__ == "__main__":
    main()
