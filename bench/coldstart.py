"""A cold start with real vLLM on the CPU, phase by phase, and 50 concurrent cold requests.

    .venv/bin/python bench/coldstart.py

Runs what `make run` runs (`python -m controlplane.fleet`: web, worker, beat and
one node agent with vLLM, embedded defaults in a temporary VAR_DIR, the tiny
model published into the local store), then:

1. one streaming request for the cold `llmfleet/tiny`: the client's time to the
   first token, split with the load's LoadEvent into queue, download, engine
   start and first token; the control plane's overhead is everything but
   download and engine start (the issue's definition), and, beside it, what is
   left once the engine's own first token (a warm request's, measured next) is
   taken off too;
2. a warm request: the engine's first token through the whole path, the
   baseline for the part of the cold one that is no start-up at all;
3. 50 concurrent requests for a second cold model (same checkpoint, another
   name): how many loads they caused and how many failed.

Ends with `RESULT cold_ttft_s=… control_plane_overhead_s=… loads_for_50_concurrent=… failed=…`.
Targets: overhead ≤ 0.5 s, exactly one load, none failed.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

OVERHEAD_TARGET_S = 0.5
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


def main() -> None:
    from tests.support import free_port, wait_for

    work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-cold-"))
    port = free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "AGENT_TOKEN"}}  # fmt: skip
    env.update(VAR_DIR=str(work / "var"), WEB_PORT=str(port), FLEET_AGENT="vllm",
               FLEET_AGENT_PORT=str(free_port()))  # fmt: skip
    log_path = work / "fleet.log"
    print(f"starting the fleet (python -m controlplane.fleet), log in {log_path}")
    with log_path.open("wb") as log:
        fleet = subprocess.Popen(
            [sys.executable, "-m", "controlplane.fleet"], cwd=ROOT, env=env, stdout=log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: b"fleet: ready" in log_path.read_bytes(), 300, "the fleet")
        os.environ.update(VAR_DIR=env["VAR_DIR"], DJANGO_SETTINGS_MODULE="controlplane.settings")
        for name in ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "AGENT_TOKEN"):
            os.environ.pop(name, None)
        measure(f"http://127.0.0.1:{port}", (work / "var" / "demo-api-key").read_text().strip())
    finally:
        fleet.send_signal(signal.SIGINT)
        try:
            fleet.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(fleet.pid, signal.SIGKILL)


def measure(base: str, key: str) -> None:
    import django

    django.setup()
    from agents.actions import register_catalog_model
    from agents.choices import LoadEventKind
    from agents.models import LoadEvent, Model

    print("cold request for llmfleet/tiny ...")
    cold_ttft, text = asyncio.run(first_token(base, key, "llmfleet/tiny"))
    print(f"  first token after {cold_ttft:.2f} s: {text!r}")
    time.sleep(1.5)  # the first-token phase is written off the request's path
    load = LoadEvent.objects.filter(kind=LoadEventKind.LOAD).latest("queued_at")
    warm = sorted(asyncio.run(first_token(base, key, "llmfleet/tiny"))[0] for _ in range(5))
    warm_ttft = warm[len(warm) // 2]
    download = load.download_seconds or 0.0
    engine = load.engine_start_seconds or 0.0
    overhead = cold_ttft - download - engine
    rest = load.total_seconds or 0.0
    print()
    print(f"{'phase of the cold request':<48}{'seconds':>10}")
    print(f"{'  queued (until the worker took the load)':<48}{load.queue_seconds or 0:>10.3f}")
    print(f"{'  download (agent)':<48}{download:>10.3f}")
    print(f"{'  engine start (agent)':<48}{engine:>10.3f}")
    agent_other = rest - (load.queue_seconds or 0) - download - engine
    print(f"{'  rest of the load (agent, task, database)':<48}{agent_other:>10.3f}")
    print(f"{'  ready -> first answer (LoadEvent)':<48}{load.first_token_seconds or 0:>10.3f}")
    print(f"{'cold time to first token (client)':<48}{cold_ttft:>10.3f}")
    print(f"{'warm time to first token (client, baseline)':<48}{warm_ttft:>10.3f}")
    print(f"{'control plane overhead (cold - download - start)':<48}{overhead:>10.3f}"
          f"   target {OVERHEAD_TARGET_S} s, ratio {overhead / OVERHEAD_TARGET_S:.2f}")  # fmt: skip
    print(f"{'  of it beyond a warm first token':<48}{overhead - warm_ttft:>10.3f}")

    model = Model.objects.get(model_id="llmfleet/tiny")
    register_catalog_model(
        "bench/tiny-b", model.source, size_bytes=model.size_bytes, engine_args=model.engine_args
    )
    print("\n50 concurrent requests for the cold bench/tiny-b ...")
    started = time.perf_counter()
    outcomes = asyncio.run(burst(base, key, "bench/tiny-b", 50))
    elapsed = time.perf_counter() - started
    loads = LoadEvent.objects.filter(model__model_id="bench/tiny-b", kind=LoadEventKind.LOAD)
    failed = outcomes.count(False)
    print(f"  all answered after {elapsed:.1f} s: {loads.count()} load(s), {failed} failed")
    print(
        f"\nRESULT cold_ttft_s={cold_ttft:.2f} control_plane_overhead_s={overhead:.3f} "
        f"loads_for_50_concurrent={loads.count()} failed={failed}"
    )


if __name__ == "__main__":
    main()
