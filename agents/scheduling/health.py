"""Pure decisions about an agent's health: the state routing sees, and heartbeats missed."""

from __future__ import annotations

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


def missed_heartbeat_verdict(
    failures: int, *, degraded_after: int, offline_after: int
) -> AgentState | None:
    """The health verdict after `failures` heartbeats missed in a row."""
    if failures >= offline_after:
        return AgentState.OFFLINE
    if failures >= degraded_after:
        return AgentState.DEGRADED
    return None
