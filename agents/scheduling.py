"""Pure decisions about the fleet: no ORM writes, no I/O. `actions.py` applies them."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from agents.choices import AgentState
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
        preferred = max(replicas, key=lambda replica: rendezvous_weight(session, replica.key))
        if replica_score(preferred) < overload:
            return preferred
    salt = session or ""
    return min(replicas, key=lambda r: (replica_score(r), -rendezvous_weight(salt, r.key)))
