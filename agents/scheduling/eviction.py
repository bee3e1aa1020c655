"""Pure decisions of the eviction ladder: which placements step down, and to where.

GPU → host RAM → local disk, for a model idle past its keep-alive, the least recently
used model of an agent under GPU memory pressure, and a model's replicas beyond its
max_replicas (`plan_sweep`).
"""

from __future__ import annotations

from collections.abc import Sequence, Set
from dataclasses import dataclass

from agents.choices import CacheLevel, LoadTrigger


@dataclass(frozen=True)
class PlacementFacts:
    """What the sweep knows of one placement on a routable agent."""

    placement_id: int
    model: str
    agent_id: str
    cache_level: str
    ready: bool
    pinned: bool
    keep_alive_seconds: float
    min_replicas: int
    idle_seconds: float
    busy: bool  # requests in flight or queued at the engine
    max_replicas: int = 0  # 0: no bound known here


@dataclass(frozen=True)
class AgentMemory:
    agent_id: str
    total: int
    free: int


@dataclass(frozen=True)
class Demotion:
    placement_id: int
    to_level: str
    trigger: str  # LoadTrigger


def excess_replicas(
    replicas: Sequence[PlacementFacts], on_gpu: int, chosen: Set[int] = frozenset()
) -> list[PlacementFacts]:
    """One model's GPU replicas beyond its max_replicas, to step down however they came: a
    load that finished after it was given up and retried elsewhere (its FAILED row turned
    READY by a heartbeat), an agent back from a partition while its model was started
    elsewhere. `on_gpu` counts the model's GPU replicas not stepping down already (`chosen`).
    The idlest go first, those with requests only when the idle are not enough (their agent
    lets the requests finish first: the step down drains), pinned ones last."""
    bound = max((f.max_replicas for f in replicas), default=0)
    if not bound or on_gpu <= bound:
        return []
    serving = [
        f
        for f in replicas
        if f.ready and f.cache_level == CacheLevel.GPU_RESIDENT and f.placement_id not in chosen
    ]
    serving.sort(key=lambda f: (f.pinned, f.busy, -f.idle_seconds, -f.placement_id))
    return serving[: on_gpu - bound]


def plan_sweep(
    placements: Sequence[PlacementFacts], agents: Sequence[AgentMemory], *, pressure_percent: int
) -> list[Demotion]:
    """One step down the ladder for each model idle past its keep-alive, and for the least
    recently used idle model of each agent under GPU memory pressure.

    GPU → host RAM after `keep_alive` idle, host RAM → local disk after twice that. Never a
    pinned model off the GPU, never a busy one, never a model's GPU replicas below its
    `min_replicas`. Local disk → gone is the agent's own cache eviction (disk pressure).
    And a model's GPU replicas beyond its `max_replicas` step down, whatever brought them
    (`excess_replicas`).
    """
    on_gpu: dict[str, int] = {}
    for facts in placements:
        if facts.ready and facts.cache_level == CacheLevel.GPU_RESIDENT:
            on_gpu[facts.model] = on_gpu.get(facts.model, 0) + 1
    demotions: list[Demotion] = []
    chosen: set[int] = set()

    def may_leave_gpu(facts: PlacementFacts) -> bool:
        return (
            facts.ready
            and facts.cache_level == CacheLevel.GPU_RESIDENT
            and not facts.pinned
            and not facts.busy
            and facts.placement_id not in chosen
            and on_gpu[facts.model] > facts.min_replicas
        )

    def demote(facts: PlacementFacts, to_level: str, trigger: str) -> None:
        demotions.append(Demotion(facts.placement_id, to_level, trigger))
        chosen.add(facts.placement_id)
        if facts.cache_level == CacheLevel.GPU_RESIDENT:
            on_gpu[facts.model] -= 1

    for facts in sorted(placements, key=lambda f: -f.idle_seconds):
        if facts.idle_seconds < facts.keep_alive_seconds:
            continue
        if may_leave_gpu(facts):
            demote(facts, CacheLevel.DRAM_CACHED, LoadTrigger.KEEP_ALIVE)
        elif (
            facts.cache_level == CacheLevel.DRAM_CACHED
            and facts.idle_seconds >= 2 * facts.keep_alive_seconds
        ):
            demote(facts, CacheLevel.NVME_CACHED, LoadTrigger.KEEP_ALIVE)

    for model_id, count in sorted(on_gpu.items()):
        replicas = [f for f in placements if f.model == model_id]
        for facts in excess_replicas(replicas, count, chosen):
            demote(facts, CacheLevel.DRAM_CACHED, LoadTrigger.EXCESS)

    pressed = {
        agent.agent_id
        for agent in agents
        if agent.total and agent.free * 100 < agent.total * pressure_percent
    }
    for agent_id in sorted(pressed):
        idle = [f for f in placements if f.agent_id == agent_id and may_leave_gpu(f)]
        if idle:
            demote(max(idle, key=lambda f: f.idle_seconds), CacheLevel.DRAM_CACHED,
                   LoadTrigger.PRESSURE)  # fmt: skip
    return demotions
