"""A model in several stores, seen from the control plane: each agent is sent every source,
nearest first; the source a load used is recorded, its store's bandwidth learned per agent,
and the next cold start's estimate reads the bandwidth of the store that agent would use."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError

from agents import actions
from agents.actions import steps
from agents.models import LoadEstimate, LoadEvent, Model
from nodeagent.protocol import LoadModelResponse, LoadTimings, SourceSpec
from tests.factories import GIB, AgentFactory, ModelFactory

pytestmark = pytest.mark.django_db

AZURE = "azure://models/org/m"
S3 = "s3://models-us/org/m"


def mirrored(**fields: object) -> Model:
    model = ModelFactory.create(
        source=AZURE, source_labels={"cloud": "azure"}, manifest="ab" * 32,
        mirrors=[{"uri": S3, "labels": {"cloud": "aws", "region": "us-east-1"}}], **fields,
    )  # fmt: skip
    return model


def load_on(agent_labels: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> LoadEvent:
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    agent = AgentFactory.create(labels=agent_labels)
    placement = actions.load_on_agent(mirrored(), agent)
    return LoadEvent.objects.get(placement=placement)


def test_an_agent_is_sent_every_source_nearest_first(monkeypatch):
    event = load_on({"cloud": "aws", "region": "us-east-1"}, monkeypatch)
    job = actions.begin_load(event.pk)
    assert job is not None
    assert job.request.source == S3  # what an agent of contract 1.3 reads
    assert job.request.sources == (
        SourceSpec(S3, {"cloud": "aws", "region": "us-east-1"}),
        SourceSpec(AZURE, {"cloud": "azure"}),
    )
    assert job.request.manifest == "ab" * 32  # the agent holds every source to it
    assert job.request.to_json()["sources"][0] == {
        "uri": S3, "labels": {"cloud": "aws", "region": "us-east-1"},
    }  # fmt: skip


def test_an_agent_without_labels_gets_the_catalog_order(monkeypatch):
    job = actions.begin_load(load_on({}, monkeypatch).pk)
    assert job is not None
    assert [s.uri for s in job.request.sources] == [AZURE, S3]


def test_the_source_a_load_used_is_recorded_and_its_store_bandwidth_learned(monkeypatch):
    event = load_on({"cloud": "aws"}, monkeypatch)
    actions.begin_load(event.pk)
    timings = LoadTimings(
        download_seconds=4.0, engine_start_seconds=10.0, source=S3, download_bytes=GIB
    )
    actions.finish_load(
        event.pk, LoadModelResponse("m", f"{event.agent.base_url}/models/m", timings)
    )
    event.refresh_from_db()
    assert (event.source, event.bytes_downloaded) == (S3, GIB)
    estimate = LoadEstimate.objects.get(agent=event.agent)
    assert estimate.source_bytes_per_second == {"s3://models-us": GIB / 4.0}
    assert estimate.bytes_per_second == GIB / 4.0


def test_a_cold_start_estimates_the_download_from_the_store_each_agent_would_read(monkeypatch):
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    # Both agents downloaded 1 GiB/s overall, but `aws` reads the S3 mirror at 100 MB/s (a
    # thin link to that region) while `azure` reads Azure Blob at 1 GiB/s.
    aws = AgentFactory(agent_id="aws", labels={"cloud": "aws"})
    azure = AgentFactory(agent_id="azure", labels={"cloud": "azure"})
    LoadEstimate.objects.create(
        agent=aws, bytes_per_second=GIB, source_bytes_per_second={"s3://models-us": 100e6}
    )
    LoadEstimate.objects.create(
        agent=azure, bytes_per_second=GIB, source_bytes_per_second={"azure://models": GIB}
    )
    placement = actions.ensure_placement(mirrored(size_bytes=20 * GIB))
    assert placement.agent.agent_id == "azure"
    # Where the agent has never read from its store, its overall figure stands in.
    LoadEstimate.objects.filter(agent=aws).update(
        bytes_per_second=2 * GIB, source_bytes_per_second={"azure://models": 10e6}
    )
    Model.objects.all().delete()
    placement = actions.ensure_placement(mirrored(size_bytes=20 * GIB))
    assert placement.agent.agent_id == "aws"


@pytest.mark.parametrize(
    ("mirrors", "message"),
    [
        ("s3://mirror/x", "JSON list"),
        ([{"labels": {}}], "not an object with a uri"),
        ([{"uri": "hdfs://m/x"}], "Mirror 1: A source is"),
        ([{"uri": "s3://mirror/x", "labels": {"cloud": 1}}], "Mirror 1: Labels are"),
        ([{"uri": "s3://mirror/x"}, {"uri": "s3://mirror/x"}], "Mirror 2 repeats s3://mirror/x"),
        ([{"uri": AZURE}], "is the source already"),
    ],
)
def test_mirrors_are_validated(mirrors, message):
    model = Model(model_id="org/m", source=AZURE, mirrors=mirrors)
    with pytest.raises(ValidationError, match=message):
        model.full_clean()


def test_a_lora_adapter_has_no_mirrors():
    base = ModelFactory.create()
    adapter = Model(
        model_id="org/lora", source="azure://models/lora", base=base, adapter_rank=8,
        mirrors=[{"uri": S3, "labels": {}}],
    )  # fmt: skip
    with pytest.raises(ValidationError, match="A LoRA adapter has one source"):
        adapter.full_clean()


def test_a_download_resumed_whole_counts_no_bytes(monkeypatch):
    event = load_on({"cloud": "aws"}, monkeypatch)
    actions.begin_load(event.pk)
    timings = LoadTimings(download_seconds=0.5, source=S3, download_bytes=0)
    actions.finish_load(
        event.pk, LoadModelResponse("m", f"{event.agent.base_url}/models/m", timings)
    )
    event.refresh_from_db()
    assert event.bytes_downloaded == 0  # not the model's size: nothing came down the wire
    assert not LoadEstimate.objects.get(agent=event.agent).source_bytes_per_second
