"""Pure decisions of cold starts: where a model can be serving soonest, when to add a
replica, and when a batch may take capacity that is not idle.

Each agent that takes new work is ranked by its estimated time to ready (from its own
history of loads, `observe`d as running means), after what must step down there to make
room on its GPUs (`victims_for`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from agents.choices import CacheLevel

# Until an agent has a history of its own (LoadEvents), estimates use these.
DEFAULT_BYTES_PER_SECOND = 200e6
DEFAULT_ENGINE_START_SECONDS = 30.0
DEFAULT_WAKE_SECONDS = 2.0
# What stepping one resident model down (stopping or sleeping its engine) adds to a load.
DEMOTION_SECONDS = 3.0


@dataclass(frozen=True)
class LoadHistory:
    """What an agent's past loads showed: download bandwidth and engine start and wake times."""

    bytes_per_second: float | None = None
    engine_start_seconds: float | None = None
    wake_seconds: float | None = None


# How much one new load moves an agent's running estimate (an exponentially weighted mean):
# about the last five loads count, so a disk or link that changed shows within a few loads.
OBSERVATION_WEIGHT = 0.3


def download_rate(overall: float | None, by_store: Mapping[str, float], store: str) -> float | None:
    """The bandwidth to expect from `store` (protocol.source_store): what this agent's
    downloads from it showed, else what its downloads from anywhere showed (None: none yet)."""
    rate = by_store.get(store)
    return rate if isinstance(rate, int | float) and rate > 0 else overall


def observe(estimate: float | None, sample: float | None) -> float | None:
    """The running estimate after one more sample (None: no sample, the estimate stands)."""
    if sample is None or sample <= 0:
        return estimate
    if estimate is None:
        return sample
    return (1 - OBSERVATION_WEIGHT) * estimate + OBSERVATION_WEIGHT * sample


@dataclass(frozen=True)
class Resident:
    """A model on a candidate agent's GPU that could step down to make room."""

    placement_id: int
    gpu_memory_bytes: int
    idle_seconds: float
    evictable: bool  # idle, not pinned, and its model keeps min_replicas without it


@dataclass(frozen=True)
class LoadCandidate:
    """An agent that takes new work, seen from one model's cold start."""

    agent_id: str
    cache_level: str  # where the model already is on this agent (CacheLevel)
    gpu_memory_total: int
    gpu_memory_free: int
    loads_in_progress: int = 0
    history: LoadHistory = LoadHistory()
    residents: tuple[Resident, ...] = ()


@dataclass(frozen=True)
class LoadPlan:
    agent_id: str
    estimated_seconds: float
    victims: tuple[int, ...] = ()  # placements to step down first, to make room


def estimate_ready_seconds(level: str, size_bytes: int, history: LoadHistory) -> float:
    """Seconds until the model serves on an agent where it is at `level` now."""
    engine_start = history.engine_start_seconds or DEFAULT_ENGINE_START_SECONDS
    if level == CacheLevel.GPU_RESIDENT:
        return 0.0
    if level == CacheLevel.DRAM_CACHED:
        return history.wake_seconds or DEFAULT_WAKE_SECONDS
    if level == CacheLevel.NVME_CACHED:
        return engine_start
    return size_bytes / (history.bytes_per_second or DEFAULT_BYTES_PER_SECOND) + engine_start


def victims_for(candidate: LoadCandidate, needed: int) -> tuple[int, ...] | None:
    """Placements to step down, least recently used first, so `needed` bytes of GPU memory are
    free; () when they already are, None when no set of idle models frees enough.

    An agent without GPU facts (gpu_memory_total 0: a CPU host) is not limited here; its own
    cache limits apply when it loads.
    """
    if candidate.gpu_memory_total == 0 or needed <= candidate.gpu_memory_free:
        return ()
    free, chosen = candidate.gpu_memory_free, []
    idle_first = sorted(
        (r for r in candidate.residents if r.evictable), key=lambda r: -r.idle_seconds
    )
    for resident in idle_first:
        chosen.append(resident.placement_id)
        free += resident.gpu_memory_bytes
        if free >= needed:
            return tuple(chosen)
    return None


def plan_load(
    candidates: Sequence[LoadCandidate], *, size_bytes: int, gpu_memory_bytes: int
) -> LoadPlan | None:
    """The agent where the model can serve soonest, and what must step down there first.

    Ranked by estimated time to ready (a model already in host RAM beats one on local
    disk beats a download at the agent's observed bandwidth, each load in progress on
    the agent costing one engine start more), then by free GPU memory, then by name.
    None when no agent has room even after stepping idle models down.
    """
    ranked: list[tuple[float, int, str, LoadPlan]] = []
    for candidate in candidates:
        victims = victims_for(candidate, gpu_memory_bytes)
        if victims is None:
            continue
        history = candidate.history
        seconds = (
            estimate_ready_seconds(candidate.cache_level, size_bytes, history)
            + candidate.loads_in_progress
            * (history.engine_start_seconds or DEFAULT_ENGINE_START_SECONDS)
            + len(victims) * DEMOTION_SECONDS
        )
        plan = LoadPlan(candidate.agent_id, seconds, victims)
        ranked.append((seconds, -candidate.gpu_memory_free, candidate.agent_id, plan))
    return min(ranked, key=lambda entry: entry[:3])[3] if ranked else None


def needs_scale_out(
    scores: Sequence[float], *, threshold: float, replicas: int, max_replicas: int
) -> bool:
    """Whether to load one more replica: every one is at the threshold and the model may grow."""
    return bool(scores) and replicas < max_replicas and min(scores) >= threshold


# --- batches: when a batch may take capacity that is not idle ----------------------------------


def batch_waits_for_idle(now: float, created: float, expires: float, wait_percent: int) -> bool:
    """Whether a batch still loads its models only on idle capacity (free GPU memory, models
    idle for a while): for the first `wait_percent` of its completion window. After that its
    deadline needs the capacity, and its loads step models down as a request's do."""
    return now < created + (expires - created) * wait_percent / 100
