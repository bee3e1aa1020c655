"""Pure decisions about the fleet: no ORM writes, no I/O. `actions` applies them."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass
from enum import StrEnum

from agents.choices import AgentState, CacheLevel, LoadTrigger
from nodeagent.protocol import GpuInfo

# Verdicts on an agent's health that outrank what it last reported and any drain order.
_HEALTH_VERDICTS = (AgentState.OFFLINE, AgentState.DEGRADED)


def effective_agent_state(
    reported: AgentState, *, draining: bool, health: AgentState | None = None
) -> AgentState:
    """The state routing sees.

    A health verdict (OFFLINE, DEGRADED) wins, since an operator must see an
    agent that is gone even while it drains; then a drain order; then what the
    agent reported. Keeping the three apart lets a drain outlast a heartbeat.
    """
    if health in _HEALTH_VERDICTS:
        return health
    if draining:
        return AgentState.DRAINING
    return reported


def health_verdict(state: AgentState) -> AgentState | None:
    """The health verdict contained in a stored effective state, if any."""
    return state if state in _HEALTH_VERDICTS else None


@dataclass(frozen=True)
class GpuSummary:
    """An agent's GPUs reduced to the columns routing and the admin read."""

    name: str
    count: int
    memory_total: int
    memory_free: int
    utilization: float | None


def summarize_gpus(gpus: Sequence[GpuInfo]) -> GpuSummary:
    """Totals across an agent's GPUs; an empty list (no GPU) gives zeros and no utilization."""
    names = sorted({gpu.name for gpu in gpus})
    utilizations = [gpu.utilization for gpu in gpus if gpu.utilization is not None]
    return GpuSummary(
        name=names[0] if len(names) == 1 else " + ".join(names),
        count=len(gpus),
        memory_total=sum(gpu.memory_total for gpu in gpus),
        memory_free=sum(gpu.memory_free for gpu in gpus),
        utilization=sum(utilizations) / len(utilizations) if utilizations else None,
    )


@dataclass(frozen=True)
class ReplicaLoad:
    """What routing knows of one READY replica: the gateway's own count of requests it has in
    flight there, and the engine's queue and KV-cache use from the last heartbeat."""

    key: str
    in_flight: int = 0
    waiting: int = 0
    kv_cache_usage: float | None = None


def replica_score(replica: ReplicaLoad) -> float:
    """Lower is better. A queued request weighs double (it has not started); a full KV cache
    adds one request's worth, so it breaks ties between equally busy replicas."""
    return replica.in_flight + 2 * replica.waiting + (replica.kv_cache_usage or 0.0)


def rendezvous_weight(session: str, replica_key: str) -> int:
    """Highest-random-weight hashing: a session's replica changes only when that replica goes."""
    digest = hashlib.blake2b(f"{session}\0{replica_key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def rendezvous_replica(replicas: Sequence[ReplicaLoad], key: str) -> ReplicaLoad:
    """`key`'s replica by highest-random-weight hashing (a session's, a prefix's home)."""
    return max(replicas, key=lambda replica: rendezvous_weight(key, replica.key))


def choose_replica(
    replicas: Sequence[ReplicaLoad], session: str | None = None, *, overload: float = 8.0
) -> ReplicaLoad | None:
    """The replica to send a request to; None when there is none.

    With a session key (the request's `user`), its rendezvous replica while that one's
    score stays under `overload`; otherwise, or without a key, the least loaded, ties broken
    by the same hashing so that equal replicas share the work deterministically.
    """
    if not replicas:
        return None
    if session:
        preferred = rendezvous_replica(replicas, session)
        if replica_score(preferred) < overload:
            return preferred
    salt = session or ""
    return min(replicas, key=lambda r: (replica_score(r), -rendezvous_weight(salt, r.key)))


class RouteReason(StrEnum):
    """Why a warm request went where it went (llmfleet_routing_decisions_total's `reason`)."""

    PREFIX = "prefix"  # a replica that holds (or is the home of) the request's prefix
    LOAD = "load"  # no replica holds it: the least loaded
    SESSION = "session"  # the `user`'s own replica
    FALLBACK = "fallback"  # one holds it, but is too much busier than the least loaded


def choose_cached_replica(
    replicas: Sequence[ReplicaLoad],
    matched: Mapping[str, int],
    home: str | None,
    session: str | None = None,
    *,
    balance: float,
    overload: float = 8.0,
) -> tuple[ReplicaLoad, RouteReason] | None:
    """Cache-aware routing: where the request's prompt prefix most likely is in an engine's KV
    cache, among the replicas whose load score is within `balance` of the least loaded.

    `matched` is how many leading chunks of the prefix each replica was last sent (the
    gateway's index): among those within the balance, the longest match wins, ties to the
    less loaded, then to `home`'s rendezvous order. With no match anywhere, `home` (the
    prefix's first chunk, as a key) picks a replica by rendezvous hashing: every web process
    sends a new prefix to the same replica without sharing any state. When the replicas
    holding the prefix (or its home) are all too busy, the request goes to the next replica
    in the home's rendezvous order within the balance (the same from every web process), or,
    with a session key, to the session rule's choice within the balance (`choose_replica`).
    """
    if not replicas:
        return None
    least = min(replica_score(replica) for replica in replicas)
    eligible = [replica for replica in replicas if replica_score(replica) - least <= balance]
    salt = home or session or ""
    holders = [replica for replica in eligible if matched.get(replica.key, 0) > 0]
    if holders:
        best = max(holders, key=lambda r: (matched[r.key], -replica_score(r),
                                            rendezvous_weight(salt, r.key)))  # fmt: skip
        return best, RouteReason.PREFIX
    held = any(matched.get(replica.key, 0) > 0 for replica in replicas)
    if home is not None:
        first = rendezvous_replica(replicas, home)
        if not held and any(replica.key == first.key for replica in eligible):
            return first, RouteReason.PREFIX
    declined = RouteReason.FALLBACK if held or home is not None else RouteReason.LOAD
    if home is not None and not session:
        return rendezvous_replica(eligible, home), declined
    chosen = choose_replica(eligible, session, overload=overload)
    assert chosen is not None
    return chosen, session_or(declined, chosen, replicas, session)


def session_or(
    reason: RouteReason, chosen: ReplicaLoad, replicas: Sequence[ReplicaLoad], session: str | None
) -> RouteReason:
    """SESSION when `chosen` is the session's own replica among `replicas`, else `reason`."""
    if session and chosen.key == rendezvous_replica(replicas, session).key:
        return RouteReason.SESSION
    return reason


# --- cold starts: where a model can be serving soonest -------------------------------------

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


# --- LoRA adapters -----------------------------------------------------------------------------

# The ranks vLLM's --max-lora-rank takes.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
DEFAULT_MAX_LORAS = 4


def engine_lora_rank(rank: int) -> int | None:
    """The smallest --max-lora-rank vLLM takes that fits an adapter of `rank`; None: none does."""
    return next((allowed for allowed in VLLM_LORA_RANKS if allowed >= rank), None)


def lora_flags(
    operator_args: Sequence[str], adapter_ranks: Sequence[int], max_loras: int
) -> tuple[str, ...]:
    """What an engine of a base model starts with so its adapters can load at run time: LoRA
    on, room for `max_loras` of them and a rank that fits the largest. Nothing without
    adapters; a flag the operator gave (in engine_args) is theirs and not repeated."""
    if not adapter_ranks:
        return ()
    given = {
        arg.partition("=")[0] for arg in operator_args if isinstance(arg, str) and arg[:2] == "--"
    }
    rank = engine_lora_rank(max(adapter_ranks)) or VLLM_LORA_RANKS[-1]
    flags: list[str] = []
    for flag, value in (
        ("--enable-lora", None),
        ("--max-loras", str(max_loras)),
        ("--max-lora-rank", str(rank)),
    ):
        if flag not in given:
            flags += [flag] if value is None else [flag, value]
    return tuple(flags)


def operator_lora_rank(operator_args: Sequence[str]) -> int | None:
    """The --max-lora-rank an operator set in a base model's engine_args, if any (validation
    reports engine_args that are not all strings; here they name no rank)."""
    items = [arg for arg in operator_args if isinstance(arg, str)]
    for index, arg in enumerate(items):
        name, sep, value = arg.partition("=")
        if name != "--max-lora-rank":
            continue
        value = value if sep else (items[index + 1] if index + 1 < len(items) else "")
        return int(value) if value.isdigit() else None
    return None


def choose_adapter_replica(
    holding: Sequence[ReplicaLoad],
    others: Sequence[ReplicaLoad],
    session: str | None,
    *,
    overload: float,
) -> ReplicaLoad | None:
    """Where an adapter's request goes: a base replica that holds the adapter (nothing to
    load), unless every such one is at `overload` and another base replica is less loaded;
    then that one, which loads it (an adapter scales out onto more base replicas, never into
    a new engine). With no replica holding it, the least loaded base replica."""
    held = choose_replica(holding, session)
    if held is not None and (replica_score(held) < overload or not others):
        return held
    other = choose_replica(others, session)
    if held is None or other is None:
        return other or held
    return other if replica_score(other) < replica_score(held) else held


def idle_adapters(
    adapters: dict[str, dict[str, object]], keep_alive: dict[str, float], now: float
) -> list[str]:
    """The adapters of one engine to unload: no request in flight and idle past their own
    keep_alive (seconds, by adapter id). One not in `keep_alive` is no longer in the catalog
    (deleted while its unload could not reach the engine): it goes as soon as it is idle."""
    idle = []
    for adapter_id, facts in adapters.items():
        seconds = keep_alive.get(adapter_id, 0.0)
        last_used = facts.get("last_used_at")
        if facts.get("requests_in_flight"):
            continue
        if adapter_id not in keep_alive or (
            isinstance(last_used, int | float) and now - last_used >= seconds
        ):
            idle.append(adapter_id)
    return sorted(idle)


# --- heartbeats ------------------------------------------------------------------------------


def missed_heartbeat_verdict(
    failures: int, *, degraded_after: int, offline_after: int
) -> AgentState | None:
    """The health verdict after `failures` heartbeats missed in a row."""
    if failures >= offline_after:
        return AgentState.OFFLINE
    if failures >= degraded_after:
        return AgentState.DEGRADED
    return None


# --- the eviction ladder ---------------------------------------------------------------------


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


# --- admission: who may start on a model's engines now -----------------------------------------

# Admission classes, best first: a held interactive request always starts before a batch one.
ADMISSION_CLASSES = ("interactive", "batch")


def replica_seats(max_num_seqs: int, factor: float, unknown: int) -> int:
    """How many requests a replica takes at once: its engine's concurrent sequences (`unknown`
    when its agent did not say) times `factor`, at least one. Past them a request would only
    wait in the engine's first-come queue, where the gateway can no longer order it."""
    return max(1, int((max_num_seqs or unknown) * factor))


def may_start(in_flight: int, capacity: int, key_in_flight: int, reserve: int) -> bool:
    """Whether a key's request may take a seat now. The last `reserve` seats are kept for keys
    holding fewer than `reserve` requests: a key that asks now and then starts at once even
    while another floods, since an engine frees a seat only when a running request ends (vLLM
    does not preempt for a waiting request's priority, only for KV space). One key alone
    uses all but `reserve` seats."""
    if in_flight >= capacity:
        return False
    return in_flight < capacity - reserve or key_in_flight < reserve


def lifted_counter(counter: float, backlogged: Sequence[float], floor: float) -> float:
    """A key's virtual-token counter as it joins the queue (VTC, "Fairness in Serving Large
    Language Models", OSDI '24): raised to the least counter among those already waiting (or,
    with none waiting, to the counter last served), so that time spent idle banks no credit
    to spend later against keys that kept sending."""
    return max(counter, min(backlogged) if backlogged else floor)


def next_in_line(
    waiting: Mapping[str, Sequence[int]], counters: Mapping[int, float]
) -> list[tuple[str, int]]:
    """(class, key) of the waiting requests' keys in the order they get the next seat: the
    best class first, and within it the least served (lowest virtual-token counter, ties to
    the key that has waited longest: its order in `waiting`)."""
    order: list[tuple[str, int]] = []
    for name in ADMISSION_CLASSES:
        keys = waiting.get(name, ())
        order.extend((name, key) for key in sorted(keys, key=lambda key: counters.get(key, 0.0)))
    return order


# --- batches: when a batch may take capacity that is not idle ----------------------------------


def batch_waits_for_idle(now: float, created: float, expires: float, wait_percent: int) -> bool:
    """Whether a batch still loads its models only on idle capacity (free GPU memory, models
    idle for a while): for the first `wait_percent` of its completion window. After that its
    deadline needs the capacity, and its loads step models down as a request's do."""
    return now < created + (expires - created) * wait_percent / 100
