"""What the tests of the agents app share: the tasks actions queue, and an agent's heartbeat."""

from __future__ import annotations

import time

import pytest

from agents.actions import steps
from agents.agent_client import HeartbeatResult
from agents.models import Agent
from nodeagent.protocol import AgentReportedState, DiskInfo, HeartbeatResponse, ModelStatus


@pytest.fixture
def queued(monkeypatch):
    """The tasks actions queue, instead of a broker: (task name, args)."""
    sent: list[tuple[str, tuple[object, ...]]] = []
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: sent.append((name, args)))
    return sent


def beat(agent: Agent, *models: ModelStatus, state: str = "IDLE") -> HeartbeatResult:
    response = HeartbeatResponse(
        agent_id=agent.agent_id, state=AgentReportedState(state), version="1", gpus=(),
        gpu_utilization=None,
        gpu_memory_total=0, gpu_memory_free=0, vllm_queue_length=0,
        disk=DiskInfo("/", 1, 1, 0), models=models,
    )  # fmt: skip
    return HeartbeatResult(agent.pk, time.time(), response)
