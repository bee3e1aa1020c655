"""History size: a /metrics scrape and a cold-start decision with 100,000 history rows.

    .venv/bin/python bench/history.py [--rows 100000] [--repeats 15]

Fills a scratch PostgreSQL database (`llmfleet_bench_history` on the local server,
or BENCH_DATABASE_URL) with 50 agents, 100 models and `--rows` load events spread
over 30 days, then times the database share (every query's execution, summed by
Django's execute_wrapper) of:

- scrape: `FleetCollector().collect()`, what `/metrics` reads (counters rolled up
  as steps finish, agents.StepCounter);
- decision: what a cold start reads to pick an agent (`failed_recently` and
  `_load_candidates`: per-agent estimates, agents.LoadEstimate).

The baseline, measured in the same run on the same rows, is what both read before
the history was bounded: aggregates over the whole load-event table. Target: each
under 50 ms of database time. Ends with `RESULT history_rows=… scrape_db_ms=…
scrape_baseline_db_ms=… decision_db_ms=… decision_baseline_db_ms=…`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGET_MS = 50.0
SCRATCH = "llmfleet_bench_history"


def scratch_database() -> str:
    url = os.environ.get("BENCH_DATABASE_URL")
    if url:
        return url
    import psycopg

    with psycopg.connect("postgresql://postgres@127.0.0.1:5432/postgres", autocommit=True) as db:
        db.execute(f"DROP DATABASE IF EXISTS {SCRATCH}")
        db.execute(f"CREATE DATABASE {SCRATCH}")
    return f"postgres://postgres@127.0.0.1:5432/{SCRATCH}"


@contextmanager
def database_time(spent: list[float]) -> Iterator[None]:
    """Add the seconds every query takes inside the block to `spent`."""
    from django.db import connection

    def timed(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        started = time.perf_counter()
        try:
            return execute(sql, params, many, context)
        finally:
            spent.append(time.perf_counter() - started)

    with connection.execute_wrapper(timed):
        yield


def median_ms(work: Callable[[], object], repeats: int) -> float:
    totals = []
    for _ in range(repeats):
        spent: list[float] = []
        with database_time(spent):
            work()
        totals.append(sum(spent) * 1000)
    return statistics.median(totals)


def fill(rows: int) -> None:
    from django.utils import timezone

    from agents.choices import CacheLevel, LoadEventKind, LoadOutcome, LoadTrigger
    from agents.models import Agent, LoadEvent, Model

    rng = random.Random(7)  # noqa: S311 - made-up history, not secrets
    agents = Agent.objects.bulk_create(
        Agent(agent_id=f"gpu-{n}", base_url=f"http://gpu-{n}:8100", gpu_count=1,
              gpu_memory_total=80 << 30, gpu_memory_free=40 << 30)
        for n in range(50)
    )  # fmt: skip
    models = Model.objects.bulk_create(
        Model(model_id=f"org/model-{n}", source=f"file:///m/{n}", size_bytes=2 << 30,
              gpu_memory_bytes=4 << 30)
        for n in range(100)
    )  # fmt: skip
    now = timezone.now()
    outcomes = [LoadOutcome.SUCCEEDED] * 8 + [LoadOutcome.FAILED]
    batch = []
    for n in range(rows):
        queued = now - timedelta(seconds=rng.uniform(60, 30 * 86400))
        load = rng.random() < 0.6
        batch.append(LoadEvent(
            agent=rng.choice(agents), model=rng.choice(models),
            kind=LoadEventKind.LOAD if load else LoadEventKind.UNLOAD,
            trigger=LoadTrigger.REQUEST if load else LoadTrigger.KEEP_ALIVE,
            outcome=rng.choice(outcomes),
            from_level=rng.choice([CacheLevel.NONE, CacheLevel.NVME_CACHED, CacheLevel.DRAM_CACHED]),
            to_level=CacheLevel.GPU_RESIDENT if load else CacheLevel.NVME_CACHED,
            queued_at=queued, finished_at=queued + timedelta(seconds=30),
            queue_seconds=0.01, download_seconds=rng.uniform(1, 20),
            engine_start_seconds=rng.uniform(5, 40), bytes_downloaded=2 << 30,
        ))  # fmt: skip
        if len(batch) == 5000 or n == rows - 1:
            LoadEvent.objects.bulk_create(batch)
            batch = []
    # queued_at is auto_now_add (bulk_create wrote now): back to when each one finished.
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "UPDATE agents_loadevent SET queued_at = finished_at - interval '30 seconds'"
        )


def rollups() -> None:
    """Counters and estimates for the history just written, as the migration builds them."""
    from django.apps import apps

    migration = importlib.import_module("agents.migrations.0004_bounded_history")
    migration.backfill(apps, None)


def baseline_scrape() -> None:
    """What /metrics read before: aggregates over every finished load event."""
    from django.db.models import Count, Sum

    from agents.choices import LoadEventKind, LoadOutcome
    from agents.models import LoadEvent

    finished = LoadEvent.objects.exclude(outcome=LoadOutcome.PENDING)
    list(finished.filter(kind=LoadEventKind.LOAD).values_list("outcome").annotate(n=Count("pk")))
    succeeded = finished.filter(kind=LoadEventKind.LOAD, outcome=LoadOutcome.SUCCEEDED)
    list(succeeded.values_list("from_level").annotate(n=Count("pk")))
    list(
        finished.filter(kind=LoadEventKind.UNLOAD, outcome=LoadOutcome.SUCCEEDED)
        .values_list("to_level", "trigger")
        .annotate(n=Count("pk"))
    )
    columns = ("queue_seconds", "download_seconds", "engine_start_seconds", "first_token_seconds")
    succeeded.aggregate(
        **{f"{c}_s": Sum(c) for c in columns}, **{f"{c}_n": Count(c) for c in columns}
    )


def baseline_history() -> None:
    """What a cold start read before: every agent's averages over all its past loads."""
    from django.db.models import Avg, Q, Sum

    from agents.choices import CacheLevel, LoadEventKind, LoadOutcome
    from agents.models import LoadEvent

    list(
        LoadEvent.objects.filter(kind=LoadEventKind.LOAD, outcome=LoadOutcome.SUCCEEDED)
        .values("agent")
        .annotate(
            downloaded=Sum("bytes_downloaded", filter=Q(download_seconds__gt=0)),
            download_seconds=Sum("download_seconds", filter=Q(download_seconds__gt=0)),
            engine_start=Avg("engine_start_seconds", filter=Q(from_level__in=[
                CacheLevel.NVME_CACHED, CacheLevel.NONE])),
            wake=Avg("engine_start_seconds", filter=Q(from_level=CacheLevel.DRAM_CACHED)),
        )
    )  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="2,000 rows, 2 repeats (CI)")
    options = parser.parse_args()
    if options.quick:
        options.rows, options.repeats = 2000, 2
    os.environ.update(
        DATABASE_URL=scratch_database(),
        REDIS_URL=os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
        SECRET_KEY="bench-history", AGENT_TOKEN="bench-history",
        DJANGO_SETTINGS_MODULE="controlplane.settings", LOG_LEVEL="WARNING",
    )  # fmt: skip
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from agents.actions import coldstarts
    from agents.models import LoadEvent, Model
    from controlplane.metrics import FleetCollector

    print(f"migrating a scratch database and writing {options.rows:,} load events ...")
    call_command("migrate", verbosity=0)
    started = time.monotonic()
    fill(options.rows)
    rollups()
    with connection.cursor() as cursor:
        cursor.execute("ANALYZE")
    print(f"  {LoadEvent.objects.count():,} rows in {time.monotonic() - started:.1f} s")

    model = Model.objects.order_by("pk").first()
    assert model is not None
    placements = list(model.placements.select_related("agent"))

    def decision() -> None:
        failed = coldstarts.failed_recently(model)
        coldstarts._load_candidates(model, placements, {event.agent_id for event in failed})

    def decision_before() -> None:
        baseline_history()
        decision()

    scrape = median_ms(lambda: list(FleetCollector().collect()), options.repeats)

    def scrape_before_work() -> None:
        baseline_scrape()
        list(FleetCollector().collect())

    scrape_before = median_ms(scrape_before_work, options.repeats)
    decided = median_ms(decision, options.repeats)
    decided_before = median_ms(decision_before, options.repeats)
    print(f"\n{'database time, median of ' + str(options.repeats):<44}{'now':>10}{'before':>10}"
          f"{'ratio':>8}{'target':>10}")  # fmt: skip
    for name, now, before in (("a /metrics scrape", scrape, scrape_before),
                              ("a cold-start decision", decided, decided_before)):  # fmt: skip
        verdict = "ok" if now < TARGET_MS else "MISSED"
        print(f"{name:<44}{now:>8.2f}ms{before:>8.2f}ms{now / before:>8.3f}{TARGET_MS:>7.0f}ms"
              f" {verdict}")  # fmt: skip
    print(
        f"RESULT history_rows={options.rows} scrape_db_ms={scrape:.2f} "
        f"scrape_baseline_db_ms={scrape_before:.2f} decision_db_ms={decided:.2f} "
        f"decision_baseline_db_ms={decided_before:.2f}"
    )


if __name__ == "__main__":
    main()
