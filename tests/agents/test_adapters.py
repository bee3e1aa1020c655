"""LoRA adapters in the catalog and the fleet state: registration's checks, the engine flags
of their bases, heartbeats reconciling what engines hold, and the pure routing decisions."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError

from agents import actions, scheduling
from agents.actions.sweeps import idle_adapters
from agents.choices import ModelKind
from agents.models import Model, Placement
from agents.scheduling import ReplicaLoad, choose_adapter_replica, engine_lora_rank, lora_flags
from nodeagent.protocol import AdapterStatus, ModelStatus
from tests.agents.conftest import beat
from tests.factories import ModelFactory, PlacementFactory


def register(model_id: str, base: str, rank: int = 8, **options):
    return actions.register_catalog_model(
        model_id, f"azure://models/{model_id}", size_bytes=1, base=base, adapter_rank=rank,
        **options,
    )[0]  # fmt: skip


@pytest.mark.django_db
def test_an_adapter_is_a_catalog_model_of_its_base():
    base = ModelFactory(model_id="org/base")
    adapter = register("org/base-sql", "org/base")
    assert (adapter.base, adapter.adapter_rank, adapter.is_adapter) == (base, 8, True)
    assert list(base.adapters.all()) == [adapter]
    assert base.lora_argv == ("--enable-lora", "--max-loras", "4", "--max-lora-rank", "8")
    register("org/base-wide", "org/base", rank=12)
    assert base.lora_argv[-1] == "16"  # vLLM takes 16, not 12


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("setup", "model_id", "base", "rank", "options", "field", "message"),
    [
        (None, "org/a", "org/missing", 8, {}, "base", "not in the catalog"),
        ("adapter", "org/a2", "org/base-x", 8, {}, "base", "is an adapter itself"),
        ("embedding", "org/a", "org/embed", 8, {}, "base", "adapters are for generation"),
        ("narrow", "org/a", "org/narrow", 16, {}, "adapter_rank", "exceeds the 8"),
        (None, "org/a", "org/base", 1024, {}, "adapter_rank", "exceeds the 512"),
        (None, "org/a", "org/base", 8, {"min_replicas": 1}, "min_replicas", "its base"),
    ],
)
def test_adapters_a_base_cannot_take_are_refused_and_nothing_is_written(
    setup, model_id, base, rank, options, field, message
):
    ModelFactory(model_id="org/base")
    if setup == "adapter":
        register("org/base-x", "org/base")
    elif setup == "embedding":
        ModelFactory(model_id="org/embed", kind=ModelKind.EMBEDDING)
    elif setup == "narrow":
        ModelFactory(model_id="org/narrow", engine_args=["--max-lora-rank", "8"])
    with pytest.raises(ValidationError) as raised:
        register(model_id, base, rank, **options)
    assert message in " ".join(raised.value.message_dict[field])
    assert not Model.objects.filter(model_id=model_id).exists()


@pytest.mark.django_db
def test_the_operators_lora_flags_win_and_a_base_without_adapters_has_none():
    assert lora_flags([], [], 4) == ()
    assert lora_flags(["--max-lora-rank", "64"], [8], 2) == ("--enable-lora", "--max-loras", "2")
    assert lora_flags(["--enable-lora", "--max-loras=8"], [32], 4) == ("--max-lora-rank", "32")
    assert engine_lora_rank(300) == 320
    assert engine_lora_rank(513) is None
    base = ModelFactory(model_id="org/base")
    assert base.lora_argv == ()
    register("org/base-off", "org/base", enabled=False)
    assert base.lora_argv == ()  # only enabled adapters start engines with LoRA


def test_an_adapter_goes_where_it_is_held_unless_that_replica_is_overloaded():
    held, other = ReplicaLoad("held", in_flight=2), ReplicaLoad("other")
    assert choose_adapter_replica([held], [other], None, overload=4) == held
    busy = ReplicaLoad("held", in_flight=6)
    assert choose_adapter_replica([busy], [other], None, overload=4) == other  # it scales out
    assert choose_adapter_replica([busy], [ReplicaLoad("o", 9)], None, overload=4) == busy
    assert choose_adapter_replica([], [other], None, overload=4) == other
    assert choose_adapter_replica([], [], None, overload=4) is None


def test_idle_adapters_are_those_past_their_keep_alive_with_nothing_in_flight():
    now = time.time()
    engine = {
        "a": {"last_used_at": now - 120, "requests_in_flight": 0},
        "b": {"last_used_at": now - 120, "requests_in_flight": 1},
        "c": {"last_used_at": now - 5, "requests_in_flight": 0},
        "gone": {"last_used_at": now - 5, "requests_in_flight": 0},  # deleted from the catalog
        "gone-busy": {"last_used_at": now - 5, "requests_in_flight": 1},
    }
    # An adapter no longer in the catalog goes once idle (its delete's unload may have missed).
    assert scheduling.idle_adapters(engine, {"a": 60, "b": 60, "c": 60}, now) == ["a", "gone"]


@pytest.mark.django_db
def test_heartbeats_say_which_adapters_each_engine_holds_and_the_sweep_finds_idle_ones():
    base = ModelFactory(model_id="org/base")
    register("org/base-a", "org/base", keep_alive=timedelta(seconds=30))
    register("org/base-b", "org/base", keep_alive=timedelta(hours=1))
    placement = PlacementFactory(model=base)
    long_ago = datetime.fromtimestamp(time.time() - 60, UTC)
    status = ModelStatus(
        model_id="org/base", cache_state="READY", cache_level="GPU_RESIDENT",
        inference_endpoint_url=placement.inference_endpoint_url, max_loras=4, max_lora_rank=8,
        max_num_seqs=64, adapters=(
            AdapterStatus("org/base-a", 3, 0, long_ago, long_ago),
            AdapterStatus("org/base-b", 1, 0, long_ago, long_ago),
        ),
    )  # fmt: skip
    actions.apply_heartbeats([beat(placement.agent, status)])
    placement.refresh_from_db()
    assert (placement.max_loras, placement.max_lora_rank) == (4, 8)
    assert placement.max_num_seqs == 64  # the gateway's seats on this replica
    assert set(placement.adapters) == {"org/base-a", "org/base-b"}
    assert placement.adapters["org/base-a"]["requests_total"] == 3
    assert idle_adapters([placement]) == [(placement.pk, "org/base-a")]

    job = actions.adapter_unload_job(placement.pk, "org/base-a")
    assert job is not None
    assert (job.model_id, job.agent_url) == ("org/base", placement.agent.base_url)
    actions.forget_adapter(placement.pk, "org/base-a")
    assert set(Placement.objects.get().adapters) == {"org/base-b"}
    assert actions.adapter_unload_job(placement.pk, "org/base-a") is None

    # The engine restarted: it reports none, and the control plane keeps none.
    actions.apply_heartbeats([beat(placement.agent, ModelStatus(
        model_id="org/base", cache_state="READY", cache_level="GPU_RESIDENT",
        inference_endpoint_url=placement.inference_endpoint_url, max_loras=4, max_lora_rank=8,
    ))])  # fmt: skip
    assert Placement.objects.get().adapters == {}
