"""History stays bounded: pruned past its retention, with counters and estimates that outlive
it, and a scrape and a cold-start decision that never aggregate it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agents import actions, tasks
from agents.actions import history, steps
from agents.choices import CacheLevel, LoadOutcome
from agents.models import LoadEstimate, LoadEvent
from controlplane.gateway import tasks as gateway_tasks
from controlplane.gateway.models import RequestMinute, Usage
from controlplane.metrics import FleetCollector
from nodeagent.protocol import LoadModelResponse, LoadTimings
from tests.factories import GIB, AgentFactory, LoadEventFactory, ModelFactory, make_api_key

pytestmark = pytest.mark.django_db


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in FleetCollector().collect()
        for sample in family.samples
    }


def test_pruning_deletes_old_history_keeps_steps_under_way_and_counters(settings):
    settings.RETENTION_LOAD_EVENTS_DAYS = 30
    now = timezone.now()
    old, recent, under_way = (LoadEventFactory(outcome=o) for o in (
        LoadOutcome.SUCCEEDED, LoadOutcome.SUCCEEDED, LoadOutcome.PENDING))  # fmt: skip
    history.count_finished(old)
    history.count_finished(recent)
    LoadEvent.objects.filter(pk__in=[old.pk, under_way.pk]).update(
        queued_at=now - timedelta(days=31)
    )
    before = scrape()
    tasks.prune_history()
    assert set(LoadEvent.objects.values_list("pk", flat=True)) == {recent.pk, under_way.pk}
    assert scrape() == before  # a counter never goes down because history was pruned
    assert before["llmfleet_cold_starts_total", (("outcome", "succeeded"),)] == 2


def test_pruning_keeps_two_days_of_minutes_and_usage_by_day(settings):
    settings.RETENTION_REQUEST_MINUTES_DAYS, settings.RETENTION_USAGE_DAYS = 2, 400
    model = ModelFactory()
    key, _ = make_api_key()
    now = timezone.now().replace(second=0, microsecond=0)
    for minutes_ago in (10, 60 * 47, 60 * 49):
        RequestMinute.objects.create(model=model, minute=now - timedelta(minutes=minutes_ago))
    for days_ago in (1, 399, 401):
        Usage.objects.create(
            api_key=key, model_id=model.model_id, day=(now - timedelta(days=days_ago)).date()
        )
    gateway_tasks.prune_history()
    assert RequestMinute.objects.count() == 2
    assert sorted((now.date() - u.day).days for u in Usage.objects.all()) == [1, 399]


def test_a_finished_load_updates_its_agents_estimates_that_the_next_cold_start_reads(
    monkeypatch,
):
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    agent = AgentFactory()
    model = ModelFactory(size_bytes=GIB)
    placement = actions.ensure_placement(model)
    event = LoadEvent.objects.get(placement=placement)
    actions.begin_load(event.pk)
    timings = LoadTimings(download_seconds=2.0, engine_start_seconds=20.0)
    endpoint = f"{agent.base_url}/models/m"
    actions.finish_load(event.pk, LoadModelResponse(model.model_id, endpoint, timings))
    estimate = LoadEstimate.objects.get(agent=agent)
    assert (estimate.bytes_per_second, estimate.engine_start_seconds) == (GIB / 2.0, 20.0)
    assert estimate.wake_seconds is None
    # The next one moves it a step towards what it showed (a running mean).
    event.from_level = CacheLevel.NVME_CACHED
    event.engine_start_seconds = 10.0
    history.observe_load(event)
    estimate.refresh_from_db()
    assert estimate.engine_start_seconds == pytest.approx(0.7 * 20.0 + 0.3 * 10.0)


def test_a_scrape_and_a_cold_start_decision_never_aggregate_the_history(monkeypatch):
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    AgentFactory()
    LoadEventFactory(outcome=LoadOutcome.SUCCEEDED)
    with CaptureQueriesContext(connection) as scraped:
        scrape()
    assert not [q["sql"] for q in scraped.captured_queries if "agents_loadevent" in q["sql"]]
    with CaptureQueriesContext(connection) as decided:
        actions.ensure_placement(ModelFactory())
    reads = [
        q["sql"] for q in decided.captured_queries
        if 'FROM "agents_loadevent"' in q["sql"] and q["sql"].startswith("SELECT")
    ]  # fmt: skip
    # One look: the model's recent failed loads (a partial index), nothing else.
    assert len(reads) == 1
    assert "finished_at" in reads[0]
