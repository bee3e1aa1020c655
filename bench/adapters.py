"""LoRA adapters with real vLLM on the CPU: an adapter's cold start against its base's, and 20
adapters through one engine.

    .venv/bin/python bench/adapters.py [--adapters 20]

Runs what `make run` runs (`python -m controlplane.fleet`: web, worker, beat and one node
agent with vLLM, embedded defaults in a temporary VAR_DIR; the tiny model and its LoRA
adapter `llmfleet/tiny-lora` published into the local store), then, in the same run:

1. the fleet's first request (the download; not measured), then the base stepped down to
   the local disk and cold-started again: `base_cold_ttft_s`, the client's time to the
   first streamed token of a cold start from the local cache;
2. with the base warm, the first request for `llmfleet/tiny-lora`, which no engine holds
   yet: `adapter_cold_ttft_s` (the agent fetches it into its cache, loads it into the
   engine, then serves); a warm adapter request and a warm base request as baselines;
3. ADAPTERS more adapters (seeded, rank 8), published and registered, requested in turn
   through the one base engine, which holds at most 4 (the base's max_loras): how many
   were answered, and how many engines served them.

Ends with `RESULT adapter_cold_ttft_s=… base_cold_ttft_s=… adapter_vs_base=…
adapters_served=… engines_started=…`. Targets: adapter_cold_ttft_s ≤ 0.5,
adapters_served = ADAPTERS with engines_started = 1.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from coldstart import READY, first_token, own_fleet, stop_fleet  # noqa: E402

ADAPTER_TARGET_S = 0.5
BASE, ADAPTER = "llmfleet/tiny", "llmfleet/tiny-lora"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="2 adapters (CI)")
    args = parser.parse_args()
    if args.quick:
        args.adapters = 2
    work, base, agent_url, fleet = own_fleet("llmfleet-bench-lora-", standby=True)
    try:
        key = (work / "var" / "demo-api-key").read_text().strip()
        measure(base, key, agent_url, work, args.adapters)
    finally:
        stop_fleet(fleet)


def ttft(base: str, key: str, model: str) -> float:
    return asyncio.run(first_token(base, key, model))[0]


def measure(base: str, key: str, agent_url: str, work: Path, count: int) -> None:
    import django

    django.setup()
    from django.conf import settings

    from agents.actions import register_catalog_model, unload
    from agents.choices import CacheLevel, LoadEventKind
    from agents.models import LoadEvent, Model, Placement
    from nodeagent import tinymodel
    from nodeagent.store.publish import publish
    from tests.e2e.agent_process import agent_metric
    from tests.support import wait_for

    token = settings.AGENT_TOKEN

    def metric(series: str) -> float:
        return agent_metric(agent_url, token, series)

    print("the fleet's first request (downloads llmfleet/tiny) ...", flush=True)
    ttft(base, key, BASE)
    placement = Placement.objects.get(model__model_id=BASE)
    unload(placement, CacheLevel.NVME_CACHED)
    stopped = Placement.objects.filter(pk=placement.pk, cache_level=CacheLevel.NVME_CACHED)
    wait_for(stopped.exists, 120, "the unload")
    wait_for(lambda: metric(READY) >= 1, 300, "a standby engine")
    print("a cold start of the base from the local cache ...", flush=True)
    base_cold = ttft(base, key, BASE)
    load = LoadEvent.objects.filter(kind=LoadEventKind.LOAD, model__model_id=BASE).latest(
        "queued_at"
    )
    print(f"  first token after {base_cold:.2f} s (engine start {load.engine_start}, "
          f"{load.engine_start_seconds or 0:.2f} s)")  # fmt: skip

    loaded = 'llmfleet_agent_adapter_loads_total{outcome="loaded"}'
    before = metric(loaded)
    adapter_cold = ttft(base, key, ADAPTER)
    assert metric(loaded) == before + 1, "the adapter's request did not load it"
    adapter_warm = statistics.median(ttft(base, key, ADAPTER) for _ in range(5))
    base_warm = statistics.median(ttft(base, key, BASE) for _ in range(5))
    print(f"  the adapter's first request: first token after {adapter_cold:.3f} s "
          f"(warm adapter {adapter_warm:.3f} s, warm base {base_warm:.3f} s)")  # fmt: skip

    base_model = Model.objects.get(model_id=BASE)
    print(f"publishing and registering {count} adapters ...", flush=True)
    for index in range(count):
        built = tinymodel.build_adapter(work / "adapters" / str(index), seed=100 + index)
        uri = (work / "var" / "store" / "bench" / f"lora-{index}").as_uri()
        publish(built, uri, {}, stream=io.StringIO())
        register_catalog_model(
            f"bench/lora-{index}", uri, size_bytes=1, base=base_model.model_id, adapter_rank=8
        )
    loads_before = LoadEvent.objects.filter(kind=LoadEventKind.LOAD, model=base_model).count()
    served, times = 0, []
    started = time.perf_counter()
    for index in range(count):
        try:
            times.append(ttft(base, key, f"bench/lora-{index}"))
            served += 1
        except AssertionError as exc:
            print(f"  bench/lora-{index} failed: {exc}")
    elapsed = time.perf_counter() - started
    loads = LoadEvent.objects.filter(kind=LoadEventKind.LOAD, model=base_model).count()
    engines = 1 + loads - loads_before
    unloaded = metric('llmfleet_agent_adapter_unloads_total{reason="lru"}')
    print(f"  {served} of {count} answered in {elapsed:.1f} s by {engines} engine(s); "
          f"first token median {statistics.median(times):.3f} s, max {max(times):.3f} s; "
          f"{unloaded:.0f} unloaded to make room (max_loras {base_model.max_loras})")  # fmt: skip

    ratio = adapter_cold / base_cold
    print(f"\n{'':<44}{'seconds':>10}")
    print(f"{'base cold start, local cache (first token)':<44}{base_cold:>10.3f}")
    print(f"{'adapter cold start, base warm (first token)':<44}{adapter_cold:>10.3f}"
          f"   target {ADAPTER_TARGET_S} s, ratio {adapter_cold / ADAPTER_TARGET_S:.2f}")  # fmt: skip
    print(f"{'warm adapter (baseline)':<44}{adapter_warm:>10.3f}")
    print(f"{'warm base (baseline)':<44}{base_warm:>10.3f}")
    print(
        f"\nRESULT adapter_cold_ttft_s={adapter_cold:.3f} base_cold_ttft_s={base_cold:.2f} "
        f"adapter_vs_base={ratio:.4f} adapters_served={served} engines_started={engines}"
    )


if __name__ == "__main__":
    main()
