"""A real agent process registers with a real control plane."""

from __future__ import annotations

import pytest

from agents.models import Agent
from tests.e2e.agent_process import running_agent
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_started_agent_registers_itself(live_server, settings, tmp_path):
    args = ["--engine", "sim", "--agent-id", "e2e-agent", "--control-plane-url", live_server.url,
            "--labels", "zone=test-1a"]  # fmt: skip
    with running_agent(tmp_path, *args, token=settings.AGENT_TOKEN) as agent:
        wait_for(
            lambda: Agent.objects.filter(agent_id="e2e-agent").exists(), 30, "the registration"
        )
        registered = Agent.objects.get(agent_id="e2e-agent")
        assert registered.base_url == agent.url
        assert registered.labels == {"zone": "test-1a"}
        assert (registered.gpu_count, registered.version) == (0, "0.1.0")
        assert "registered with" in agent.log()


def test_an_agent_with_a_wrong_token_is_refused_and_keeps_serving(live_server, tmp_path):
    args = ["--engine", "sim", "--agent-id", "intruder", "--control-plane-url", live_server.url]
    with running_agent(tmp_path, *args, token="not-the-token") as agent:
        wait_for(lambda: "registration refused: HTTP 401" in agent.log(), 30, "the refusal")
        assert agent.heartbeat()["agent_id"] == "intruder"
    assert not Agent.objects.exists()
