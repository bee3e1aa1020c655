"""A real agent process registers with a real control plane."""

from __future__ import annotations

import io

import pytest
import requests
from django.core.management import CommandError, call_command

from agents import tasks
from agents.choices import AgentState
from agents.models import Agent
from nodeagent.protocol import CONTRACT_VERSION
from tests.e2e.agent_process import running_agent
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_started_agent_registers_itself(live_server, settings, tmp_path):
    args = ["--engine", "sim", "--agent-id", "e2e-agent", "--control-plane-url", live_server.url,
            "--labels", "zone=test-1a"]  # fmt: skip
    with running_agent(tmp_path, *args, token=settings.AGENT_TOKEN) as agent:
        agent.wait_registered()
        registered = Agent.objects.get(agent_id="e2e-agent")
        assert registered.base_url == agent.url
        assert registered.labels == {"zone": "test-1a"}
        assert (registered.gpu_count, registered.version) == (0, "0.1.0")
        # Enrolled: the control plane polls it with its own credential, which it kept.
        assert agent.credential.startswith("lfa_")
        assert agent.credential == registered.credential
        before = registered.last_heartbeat_at
        tasks.poll_heartbeats()
        registered.refresh_from_db()
        assert (registered.heartbeat_failures, registered.contract_version) == (0, CONTRACT_VERSION)
        assert registered.last_heartbeat_at > before

        # Another host holding the enrolment token cannot take its name, nor its traffic.
        impostor = ["--engine", "sim", "--agent-id", "e2e-agent", "--control-plane-url",
                    live_server.url]  # fmt: skip
        (tmp_path / "impostor").mkdir()
        with running_agent(tmp_path / "impostor", *impostor, token=settings.AGENT_TOKEN) as other:
            wait_for(lambda: "registration refused: HTTP 403" in other.log(), 30, "the refusal")
        assert Agent.objects.get(agent_id="e2e-agent").base_url == agent.url


def test_an_agent_with_a_wrong_token_is_refused_and_takes_no_calls(live_server, tmp_path):
    args = ["--engine", "sim", "--agent-id", "intruder", "--control-plane-url", live_server.url]
    with running_agent(tmp_path, *args, token="not-the-token") as agent:
        wait_for(lambda: "registration refused: HTTP 401" in agent.log(), 30, "the refusal")
        # Not enrolled: nobody may call it (its token is the fleet's, or a guess), but it lives.
        response = agent.post("/heartbeat")
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "not_enrolled"
        assert requests.get(f"{agent.url}/healthz", timeout=5).status_code == 200
    assert not Agent.objects.exists()


def test_rotating_and_revoking_a_credential_reach_the_real_agent(live_server, settings, tmp_path):
    args = ["--engine", "sim", "--agent-id", "e2e-rotated", "--control-plane-url", live_server.url]
    with running_agent(tmp_path, *args, token=settings.AGENT_TOKEN) as agent:
        wait_for(lambda: agent.credential.startswith("lfa_"), 30, "the enrolment")
        first = agent.credential
        call_command("agent_credential", "rotate", "e2e-rotated", stdout=io.StringIO())
        row = Agent.objects.get(agent_id="e2e-rotated")
        assert agent.credential == row.credential != first
        tasks.poll_heartbeats()
        row.refresh_from_db()
        assert (row.heartbeat_failures, row.contract_error) == (0, "")

        rotated = agent.credential
        call_command("agent_credential", "revoke", "e2e-rotated", stdout=io.StringIO())
        # The agent was told: the revoked credential reaches nothing there either.
        refused = requests.post(f"{agent.url}/heartbeat", timeout=5,
                                headers={"Authorization": f"Bearer {rotated}"})  # fmt: skip
        assert refused.status_code == 401
        assert not (agent.cache_dir / "agent-credential").exists()
        row.refresh_from_db()
        assert (row.state, row.credential) == (AgentState.OFFLINE, "")
        tasks.poll_heartbeats()  # not called: it has no credential to be called with
        row.refresh_from_db()
        assert row.state == AgentState.OFFLINE
        with pytest.raises(CommandError, match="not enrolled"):
            call_command("agent_credential", "rotate", "e2e-rotated")
