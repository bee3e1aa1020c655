"""The lifecycle's pure decisions: where to load, what to step down, health verdicts."""

from __future__ import annotations

from agents.choices import AgentState, CacheLevel, LoadTrigger
from agents.scheduling import (
    DEFAULT_ENGINE_START_SECONDS,
    AgentMemory,
    Demotion,
    LoadCandidate,
    LoadHistory,
    PlacementFacts,
    Resident,
    estimate_ready_seconds,
    missed_heartbeat_verdict,
    needs_scale_out,
    plan_load,
    plan_sweep,
    victims_for,
)

GIB = 1024**3


def candidate(name, level=CacheLevel.NONE, free=40 * GIB, total=80 * GIB, **extra):
    return LoadCandidate(name, level, total, free, **extra)


def test_cached_levels_beat_a_download():
    candidates = [
        candidate("download"),
        candidate("disk", CacheLevel.NVME_CACHED),
        candidate("ram", CacheLevel.DRAM_CACHED),
    ]
    plan = plan_load(candidates, size_bytes=10 * GIB, gpu_memory_bytes=8 * GIB)
    assert plan is not None
    assert plan.agent_id == "ram"
    plan = plan_load(candidates[:2], size_bytes=10 * GIB, gpu_memory_bytes=8 * GIB)
    assert plan is not None
    assert plan.agent_id == "disk"


def test_observed_bandwidth_decides_between_downloads():
    slow = candidate("slow", history=LoadHistory(bytes_per_second=50e6))
    fast = candidate("fast", history=LoadHistory(bytes_per_second=2e9))
    plan = plan_load([slow, fast], size_bytes=20 * GIB, gpu_memory_bytes=8 * GIB)
    assert plan is not None
    assert plan.agent_id == "fast"
    assert plan.estimated_seconds == estimate_ready_seconds(CacheLevel.NONE, 20 * GIB, fast.history)


def test_a_fast_disk_start_loses_to_ram_but_a_slow_engine_start_counts():
    quick = candidate("quick", CacheLevel.NVME_CACHED, history=LoadHistory(engine_start_seconds=5))
    sleepy = candidate("sleepy", CacheLevel.DRAM_CACHED, history=LoadHistory(wake_seconds=9))
    plan = plan_load([quick, sleepy], size_bytes=GIB, gpu_memory_bytes=GIB)
    assert plan is not None
    assert plan.agent_id == "quick"


def test_loads_in_progress_and_free_memory_break_ties():
    busy = candidate("busy", loads_in_progress=2)
    roomy = candidate("roomy", free=70 * GIB)
    plain = candidate("plain")
    plan = plan_load([busy, plain, roomy], size_bytes=GIB, gpu_memory_bytes=GIB)
    assert plan is not None
    assert plan.agent_id == "roomy"
    busy_plan = plan_load([busy], size_bytes=GIB, gpu_memory_bytes=GIB)
    assert busy_plan is not None
    assert busy_plan.estimated_seconds > 2 * DEFAULT_ENGINE_START_SECONDS


def test_no_room_means_least_recently_used_idle_models_step_down_first():
    residents = (
        Resident(1, 20 * GIB, idle_seconds=30, evictable=True),
        Resident(2, 20 * GIB, idle_seconds=900, evictable=True),
        Resident(3, 60 * GIB, idle_seconds=5000, evictable=False),  # busy or pinned
        Resident(4, 20 * GIB, idle_seconds=600, evictable=True),
    )
    full = candidate("full", free=5 * GIB, residents=residents)
    assert victims_for(full, 4 * GIB) == ()
    assert victims_for(full, 20 * GIB) == (2,)
    assert victims_for(full, 30 * GIB) == (2, 4)
    assert victims_for(full, 100 * GIB) is None
    plan = plan_load([full], size_bytes=GIB, gpu_memory_bytes=30 * GIB)
    assert plan is not None
    assert plan.victims == (2, 4)


def test_an_agent_with_room_beats_one_that_must_evict_and_none_fits_nowhere():
    full = candidate("full", free=0, residents=(Resident(1, 40 * GIB, 900, True),))
    roomy = candidate("roomy", free=30 * GIB)
    plan = plan_load([full, roomy], size_bytes=GIB, gpu_memory_bytes=20 * GIB)
    assert plan is not None
    assert plan.agent_id == "roomy"
    assert plan.victims == ()
    assert plan_load([full], size_bytes=GIB, gpu_memory_bytes=50 * GIB) is None
    assert plan_load([], size_bytes=GIB, gpu_memory_bytes=GIB) is None


def test_a_host_without_gpu_facts_is_not_limited_by_gpu_memory():
    cpu = candidate("cpu", free=0, total=0)
    plan = plan_load([cpu], size_bytes=GIB, gpu_memory_bytes=80 * GIB)
    assert plan is not None
    assert plan.victims == ()


def test_missed_heartbeats_degrade_then_take_an_agent_offline():
    verdict = [missed_heartbeat_verdict(n, degraded_after=2, offline_after=4) for n in range(6)]
    assert verdict == [None, None, AgentState.DEGRADED, AgentState.DEGRADED,
                       AgentState.OFFLINE, AgentState.OFFLINE]  # fmt: skip


def test_scale_out_only_when_every_replica_is_over_the_threshold_and_room_remains():
    assert needs_scale_out([9, 12], threshold=8, replicas=2, max_replicas=3)
    assert not needs_scale_out([9, 3], threshold=8, replicas=2, max_replicas=3)
    assert not needs_scale_out([9, 12], threshold=8, replicas=3, max_replicas=3)
    assert not needs_scale_out([], threshold=8, replicas=0, max_replicas=3)


def facts(pk, model="m", agent="a", level=CacheLevel.GPU_RESIDENT, idle=1000.0, **extra):
    values = dict(
        placement_id=pk, model=model, agent_id=agent, cache_level=level,
        ready=level == CacheLevel.GPU_RESIDENT, pinned=False, keep_alive_seconds=600.0,
        min_replicas=0, idle_seconds=idle, busy=False,
    )  # fmt: skip
    values.update(extra)
    return PlacementFacts(**values)


def test_keep_alive_steps_one_level_at_a_time():
    plan = plan_sweep(
        [
            facts(1, idle=599),  # not yet
            facts(2, idle=601),  # GPU -> RAM
            facts(3, level=CacheLevel.DRAM_CACHED, idle=1000),  # RAM, not twice keep-alive yet
            facts(4, level=CacheLevel.DRAM_CACHED, idle=1300),  # RAM -> disk
        ],
        [],
        pressure_percent=5,
    )
    assert plan == [
        Demotion(4, CacheLevel.NVME_CACHED, LoadTrigger.KEEP_ALIVE),
        Demotion(2, CacheLevel.DRAM_CACHED, LoadTrigger.KEEP_ALIVE),
    ]


def test_pinned_busy_and_min_replicas_stay_on_the_gpu():
    plan = plan_sweep(
        [
            facts(1, model="pinned", pinned=True),
            facts(2, model="busy", busy=True),
            facts(3, model="floor", min_replicas=2),
            facts(4, model="floor", min_replicas=2, agent="b"),
            facts(5, model="floor", min_replicas=2, agent="c", idle=2000),
        ],
        [],
        pressure_percent=5,
    )
    # Three replicas of "floor" and a floor of two: only the idlest one goes.
    assert plan == [Demotion(5, CacheLevel.DRAM_CACHED, LoadTrigger.KEEP_ALIVE)]


def test_memory_pressure_steps_down_the_least_recently_used_idle_model():
    placements = [
        facts(1, model="x", idle=100),
        facts(2, model="y", idle=300),
        facts(3, model="z", idle=5, busy=True),
        facts(4, model="w", agent="roomy", idle=400),
    ]
    agents = [AgentMemory("a", 80 * GIB, 2 * GIB), AgentMemory("roomy", 80 * GIB, 40 * GIB)]
    assert plan_sweep(placements, agents, pressure_percent=5) == [
        Demotion(2, CacheLevel.DRAM_CACHED, LoadTrigger.PRESSURE)
    ]
    assert plan_sweep(placements, agents, pressure_percent=0) == []


def test_replicas_beyond_max_replicas_step_down_the_idlest_first():
    plan = plan_sweep(
        [
            facts(1, agent="a", idle=5, max_replicas=2),
            facts(2, agent="b", idle=50, max_replicas=2, busy=True),
            facts(3, agent="c", idle=40, max_replicas=2),
            facts(4, agent="d", idle=90, max_replicas=2, pinned=True),
        ],
        [],
        pressure_percent=5,
    )
    # Four on the GPU, two allowed: the idle unpinned ones go before the busy and the pinned.
    assert plan == [
        Demotion(3, CacheLevel.DRAM_CACHED, LoadTrigger.EXCESS),
        Demotion(1, CacheLevel.DRAM_CACHED, LoadTrigger.EXCESS),
    ]


def test_an_excess_already_stepping_down_for_idleness_is_not_counted_twice():
    plan = plan_sweep(
        [facts(1, idle=700, max_replicas=1), facts(2, agent="b", idle=10, max_replicas=1)],
        [],
        pressure_percent=5,
    )
    assert plan == [Demotion(1, CacheLevel.DRAM_CACHED, LoadTrigger.KEEP_ALIVE)]
