"""Shapes of the node agent's HTTP contract, shared by the agent and the control plane.

Plain dataclasses and the standard library only: the control plane imports
this module, and the agent must stay free of Django.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Agent states an agent reports about itself. The control plane adds DEGRADED,
# OFFLINE and DRAINING from its own view (heartbeats missed, operator orders).
AGENT_REPORTED_STATES = ("IDLE", "LOADING_MODEL", "INFERRING")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it. Memory in bytes, utilization in percent."""

    index: int
    name: str
    memory_total: int
    memory_free: int
    utilization: float | None = None
    uuid: str = ""


@dataclass(frozen=True)
class RegisterRequest:
    """Body of `POST /api/agents/register`, sent by an agent when it starts.

    `base_url` is where the control plane reaches the agent's HTTP API.
    A host without a GPU sends an empty `gpus` list, never invented figures.
    """

    agent_id: str
    base_url: str
    version: str = ""
    state: str = "IDLE"
    gpus: tuple[GpuInfo, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["gpus"] = [asdict(gpu) for gpu in self.gpus]
        return body


@dataclass(frozen=True)
class RegisterResponse:
    """The control plane's answer to a registration."""

    agent_id: str
    created: bool
    state: str
    heartbeat_interval_seconds: int
