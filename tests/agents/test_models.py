from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from agents.choices import AgentState, ModelKind, PlacementState
from agents.models import Model, Placement
from tests.factories import AgentFactory, ModelFactory, PlacementFactory

pytestmark = pytest.mark.django_db


def test_a_model_is_placed_at_most_once_per_agent():
    placement = PlacementFactory()
    with pytest.raises(IntegrityError), transaction.atomic():
        Placement.objects.create(agent=placement.agent, model=placement.model)
    # The same model on another agent, and another model on the same agent, are fine.
    PlacementFactory(model=placement.model)
    PlacementFactory(agent=placement.agent)
    assert Placement.objects.count() == 3


def test_max_replicas_below_min_replicas_is_refused_by_the_database():
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelFactory(min_replicas=3, max_replicas=2)
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelFactory(max_replicas=0)


def test_ready_for_lists_ready_placements_on_agents_that_take_work():
    model = ModelFactory()
    ready = PlacementFactory(model=model)
    PlacementFactory(model=model, state=PlacementState.DOWNLOADING)
    PlacementFactory(model=model, state=PlacementState.FAILED)
    for state in (AgentState.DRAINING, AgentState.DEGRADED, AgentState.OFFLINE):
        PlacementFactory(model=model, agent=AgentFactory(state=state))
    busy = PlacementFactory(model=model, agent=AgentFactory(state=AgentState.INFERRING))
    PlacementFactory()  # another model

    assert set(Placement.objects.ready_for(model)) == {ready, busy}


def test_ready_for_uses_one_query_with_agents_joined(django_assert_num_queries):
    model = ModelFactory()
    PlacementFactory.create_batch(3, model=model)
    with django_assert_num_queries(1):
        agents = [placement.agent.base_url for placement in Placement.objects.ready_for(model)]
    assert len(agents) == 3


@pytest.mark.parametrize(
    ("source", "valid"),
    [
        ("azure://models/meta-llama/Llama-3.1-8B", True),
        ("file:///srv/models/tiny", True),
        ("azure://Models/x", False),  # container names are lowercase
        ("azure://models", False),  # no prefix
        ("file://relative/dir", False),
        ("file:///", False),
        ("s3://bucket/key", True),
        ("s3://Bucket/key", False),  # bucket names are lowercase
        ("s3://bucket", False),
        ("gs://my_bucket.example/a/b", True),
        ("gs://bucket/", False),
        ("hdfs://cluster/model", False),  # an unknown scheme
    ],
)
def test_model_sources_are_validated(source, valid):
    model = Model(model_id="org/name", source=source)
    if valid:
        model.full_clean()
    else:
        with pytest.raises(ValidationError) as raised:
            model.full_clean()
        assert "source" in raised.value.message_dict


@pytest.mark.parametrize("model_id", ["has space", "-leading-dash", "", "a" * 201, "semi;colon"])
def test_model_ids_clients_cannot_send_are_refused(model_id):
    with pytest.raises(ValidationError) as raised:
        Model(model_id=model_id, source="file:///m").full_clean()
    assert "model_id" in raised.value.message_dict


def test_engine_args_must_be_a_list_of_strings():
    with pytest.raises(ValidationError) as raised:
        Model(model_id="m", source="file:///m", engine_args=["--max-model-len", 512]).full_clean()
    assert "engine_args" in raised.value.message_dict


def test_placement_progress():
    placement = PlacementFactory.build(bytes_done=0, bytes_total=0)
    assert placement.progress is None
    placement.bytes_done, placement.bytes_total = 250, 1000
    assert placement.progress == 0.25


@pytest.mark.parametrize(
    ("url", "valid"),
    [
        ("http://gpu-node-3:8100", True),  # a Kubernetes or /etc/hosts name
        ("https://gpu-1.eu-west.example.com", True),
        ("http://10.0.0.7:8100", True),
        ("http://[fd00::7]:8100", True),
        ("http://localhost:8100/prefix", True),
        ("ftp://gpu-1", False),
        ("http://", False),
        ("http://gpu-1:99999", False),
        ("http://-bad-.host", False),
        ("http://user:pw@gpu-1", False),
        ("gpu-1:8100", False),
    ],
)
def test_agent_base_urls(url, valid):
    agent = AgentFactory.build(base_url=url)
    if valid:
        agent.full_clean()
    else:
        with pytest.raises(ValidationError) as raised:
            agent.full_clean()
        assert "base_url" in raised.value.message_dict


def test_the_placement_states_and_levels_are_the_contracts_own():
    from agents.choices import CacheLevel, PlacementState
    from nodeagent import protocol

    assert set(PlacementState.values) == {state.value for state in protocol.ModelState}
    assert set(CacheLevel.values) == {level.value for level in protocol.CacheLevel}


def test_an_embedding_models_engines_start_as_pooling_runners_unless_the_operator_says():
    generate = Model(model_id="g", engine_args=["--dtype", "float32"])
    embedding = Model(model_id="e", kind=ModelKind.EMBEDDING, engine_args=["--dtype", "float32"])
    chosen = Model(model_id="c", kind=ModelKind.EMBEDDING, engine_args=["--runner=pooling"])
    assert generate.engine_argv == ("--dtype", "float32")
    assert embedding.engine_argv == ("--runner", "pooling", "--dtype", "float32")
    assert chosen.engine_argv == ("--runner=pooling",)
    with pytest.raises(ValidationError, match="kind"):
        Model(model_id="x", source="file:///m", kind="classify").full_clean()
