from __future__ import annotations

import pytest

from agents.choices import AgentState
from agents.scheduling import ReplicaLoad, choose_replica, effective_agent_state, summarize_gpus
from nodeagent.protocol import GpuInfo

GIB = 1024**3


@pytest.mark.parametrize(
    ("reported", "draining", "health", "expected"),
    [
        (AgentState.INFERRING, False, None, AgentState.INFERRING),
        (AgentState.INFERRING, True, None, AgentState.DRAINING),
        (AgentState.IDLE, True, AgentState.OFFLINE, AgentState.OFFLINE),
        (AgentState.IDLE, False, AgentState.DEGRADED, AgentState.DEGRADED),
        (AgentState.IDLE, True, AgentState.DEGRADED, AgentState.DEGRADED),
    ],
)
def test_health_outranks_draining_which_outranks_reports(reported, draining, health, expected):
    assert effective_agent_state(reported, draining=draining, health=health) == expected


def test_gpus_are_summed_and_utilization_averaged():
    gpus = [
        GpuInfo(0, "NVIDIA H100", memory_total=80 * GIB, memory_free=30 * GIB, utilization=50.0),
        GpuInfo(1, "NVIDIA H100", memory_total=80 * GIB, memory_free=70 * GIB, utilization=10.0),
    ]
    summary = summarize_gpus(gpus)
    assert (summary.name, summary.count) == ("NVIDIA H100", 2)
    assert (summary.memory_total, summary.memory_free) == (160 * GIB, 100 * GIB)
    assert summary.utilization == 30.0


def test_a_host_without_gpus_reports_nothing_invented():
    summary = summarize_gpus([])
    assert (summary.name, summary.count, summary.memory_total, summary.utilization) == (
        "",
        0,
        0,
        None,
    )


def test_mixed_gpu_models_are_named_together():
    gpus = [
        GpuInfo(0, "NVIDIA L4", 24 * GIB, 24 * GIB),
        GpuInfo(1, "NVIDIA A10", 24 * GIB, 24 * GIB),
    ]
    assert summarize_gpus(gpus).name == "NVIDIA A10 + NVIDIA L4"


def replicas(*loads: tuple[str, int, int, float | None]) -> list[ReplicaLoad]:
    return [ReplicaLoad(key, in_flight, waiting, kv) for key, in_flight, waiting, kv in loads]


def test_the_least_loaded_replica_is_chosen():
    pool = replicas(("a", 3, 0, 0.1), ("b", 1, 1, 0.2), ("c", 1, 0, 0.9), ("d", 2, 0, 0.0))
    assert choose_replica(pool).key == "c"  # 1.9 beats 2.0 (d), 3.2 (b), 3.1 (a)
    assert choose_replica([]) is None


def test_a_session_sticks_to_its_replica_while_it_is_not_overloaded():
    pool = replicas(("a", 0, 0, None), ("b", 0, 0, None), ("c", 0, 0, None))
    home = choose_replica(pool, "user-42").key
    assert all(choose_replica(pool, "user-42").key == home for _ in range(10))
    busier = [ReplicaLoad(r.key, 5 if r.key == home else 0) for r in pool]
    assert choose_replica(busier, "user-42", overload=8).key == home  # busy but not overloaded
    overloaded = [ReplicaLoad(r.key, 9 if r.key == home else 0) for r in pool]
    assert choose_replica(overloaded, "user-42", overload=8).key != home


def test_removing_a_replica_moves_only_the_sessions_that_were_on_it():
    pool = replicas(*((key, 0, 0, None) for key in "abcd"))
    sessions = [f"user-{n}" for n in range(1000)]
    before = {s: choose_replica(pool, s).key for s in sessions}
    drained = [r for r in pool if r.key != "b"]
    after = {s: choose_replica(drained, s).key for s in sessions}
    moved = {s for s in sessions if before[s] != after[s]}
    assert moved == {s for s in sessions if before[s] == "b"}
    # And the sessions spread over the replicas: each holds 15-35 % of them.
    shares = [list(before.values()).count(key) / len(sessions) for key in "abcd"]
    assert all(0.15 <= share <= 0.35 for share in shares)
