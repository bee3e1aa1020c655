"""A cold start's trace, recorded from its LoadEvent (agents.traces) to a real OTLP receiver:
its root has the ids chosen as the load was queued, and its phases sit under it."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone

from agents import traces as cold_traces
from agents.actions import sweeps
from controlplane import traces
from nodeagent.tracing import new_ids
from tests.factories import LoadEventFactory, PlacementFactory
from tests.otlp import otlp_receiver

pytestmark = pytest.mark.django_db


@pytest.fixture
def receiver(settings):
    with otlp_receiver() as receiver:
        settings.TRACING_ENDPOINT = f"{receiver.url}/v1/traces"
        traces.tracer.cache_clear()
        yield receiver  # each test shuts its tracer down: all it recorded is exported then
    traces.tracer.cache_clear()


def test_a_cold_starts_phases_are_recorded_under_its_chosen_root(receiver):
    queued = timezone.now() - timedelta(seconds=10)
    trace_id, span_id = new_ids()
    event = LoadEventFactory(
        trace_id=trace_id, span_id=span_id, outcome="SUCCEEDED",
        started_at=queued + timedelta(seconds=1), finished_at=queued + timedelta(seconds=9),
        download_seconds=3.0, engine_start_seconds=4.0, compile_cache_seconds=0.5,
        compile_cache="store", engine_start="standby", source="gs://models/org/tiny",
        bytes_downloaded=1234, failed_sources="s3://models/org/tiny: store_unreachable",
    )  # fmt: skip
    event.queued_at = queued
    cold_traces.record_cold_start(event)
    cold_traces.record_first_token(event, 0.25)
    traces.tracer(traces.LIFECYCLE).shutdown()
    spans = {span.name: span for span in receiver.wait_for(6, trace_id=trace_id)}
    root = spans[f"cold start {event.model.model_id}"]
    assert (root.span_id, root.parent_id) == (span_id, "")
    assert root.service == "llmfleet-lifecycle"
    assert root.end_ns - root.start_ns == 9_000_000_000
    for phase in ("queued", "download", "engine start", "first token"):
        assert spans[phase].parent_id == span_id, phase
    download = spans["download"]
    assert download.attributes["llmfleet.failovers"] == 1
    assert download.attributes["llmfleet.bytes"] == 1234
    assert (download.end_ns - download.start_ns) == 3_000_000_000
    cache = spans["compile cache"]
    assert cache.parent_id == spans["engine start"].span_id
    assert cache.end_ns - cache.start_ns == 500_000_000
    assert spans["first token"].end_ns - spans["first token"].start_ns == 250_000_000


def test_nothing_is_recorded_for_a_load_queued_while_tracing_was_off(receiver):
    event = LoadEventFactory(outcome="SUCCEEDED", finished_at=timezone.now())
    cold_traces.record_cold_start(event)
    traces.tracer(traces.LIFECYCLE).shutdown()
    assert receiver.spans == []


def test_a_load_closed_by_the_sweep_still_gets_its_root(receiver):
    # Its task died (a loads worker killed): the sweep closes the load from a heartbeat.
    trace_id, span_id = new_ids()
    placement = PlacementFactory(state="READY", cache_level="GPU_RESIDENT")
    event = LoadEventFactory(agent=placement.agent, model=placement.model, placement=placement,
                             trace_id=trace_id, span_id=span_id)  # fmt: skip
    assert sweeps._close_as_done(event.pk) == 1
    traces.tracer(traces.LIFECYCLE).shutdown()
    [root] = receiver.wait_for(1, trace_id=trace_id, span_id=span_id)
    assert root.attributes["llmfleet.outcome"] == "SUCCEEDED"


def test_sampling_leaves_a_cold_start_out_whole(receiver, settings):
    settings.TRACING_SAMPLE_RATIO = 0.0
    traces.tracer.cache_clear()
    assert traces.cold_start_ids() == ("", "")  # no ids: nothing recorded under it, no link
    settings.TRACING_SAMPLE_RATIO = 1.0
    traces.tracer.cache_clear()
    assert all(traces.cold_start_ids())
