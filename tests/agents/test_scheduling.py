from __future__ import annotations

import pytest

from agents.choices import AgentState
from agents.scheduling import effective_agent_state, summarize_gpus
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
