from __future__ import annotations

import json

import pytest
from django.test import Client

from agents.choices import AgentState
from agents.models import Agent
from nodeagent.protocol import CONTRACT_VERSION, GpuInfo, RegisterRequest

pytestmark = pytest.mark.django_db

URL = "/api/agents/register"
GIB = 1024**3


def registration(**overrides):
    request = RegisterRequest(
        agent_id="gpu-a1.eu-west",
        base_url="http://10.0.0.7:8100",
        version="0.1.0",
        gpus=(GpuInfo(0, "NVIDIA H100 80GB HBM3", 80 * GIB, 79 * GIB, 0.0, "GPU-abc"),),
        labels={"zone": "eu-west-1a"},
    ).to_json()
    request.update(overrides)
    return request


def post(client: Client, body, headers) -> object:
    data = body if isinstance(body, str) else json.dumps(body)
    return client.post(URL, data=data, content_type="application/json", **headers)


def test_a_new_agent_is_registered(client, agent_headers):
    response = post(client, registration(), agent_headers)

    assert response.status_code == 201
    assert response.json() == {
        "agent_id": "gpu-a1.eu-west",
        "created": True,
        "state": "IDLE",
        "heartbeat_interval_seconds": 5,
        "contract": CONTRACT_VERSION,
    }
    agent = Agent.objects.get(agent_id="gpu-a1.eu-west")
    assert agent.base_url == "http://10.0.0.7:8100"
    assert (agent.gpu_name, agent.gpu_count, agent.gpu_memory_total) == (
        "NVIDIA H100 80GB HBM3",
        1,
        80 * GIB,
    )
    assert agent.gpus[0]["uuid"] == "GPU-abc"
    assert agent.labels == {"zone": "eu-west-1a"}
    assert agent.last_heartbeat_at is not None


def test_registering_again_updates_the_same_row(client, agent_headers):
    post(client, registration(), agent_headers)
    Agent.objects.filter(agent_id="gpu-a1.eu-west").update(
        state=AgentState.OFFLINE, heartbeat_failures=7
    )

    response = post(
        client, registration(base_url="http://10.0.0.8:8100", version="0.2.0"), agent_headers
    )

    assert response.status_code == 200
    assert response.json()["created"] is False
    agent = Agent.objects.get()
    assert (agent.base_url, agent.version) == ("http://10.0.0.8:8100", "0.2.0")
    # It is alive again: the OFFLINE verdict and the failure count are over.
    assert (agent.state, agent.heartbeat_failures) == (AgentState.IDLE, 0)


def test_a_host_without_gpu_registers_with_no_gpu_figures(client, agent_headers):
    response = post(client, registration(gpus=[]), agent_headers)
    assert response.status_code == 201
    agent = Agent.objects.get()
    assert (agent.gpu_count, agent.gpu_memory_total, agent.gpu_utilization) == (0, 0, None)


def test_malformed_json_is_a_400_and_writes_nothing(client, agent_headers):
    response = post(client, '{"agent_id": "x", ', agent_headers)
    assert response.status_code == 400
    assert "JSON parse error" in response.json()["detail"]
    assert not Agent.objects.exists()


def test_invalid_fields_get_per_field_errors(client, agent_headers):
    body = registration(
        agent_id="bad id!",
        base_url="not a url",
        state="ASLEEP",
        gpus=[{"index": 0, "name": "H100", "memory_total": 10, "memory_free": 20}],
        labels={"zone": ["a"]},
    )
    response = post(client, body, agent_headers)

    assert response.status_code == 400
    errors = response.json()
    assert set(errors) == {"agent_id", "base_url", "state", "gpus", "labels"}
    assert errors["gpus"] == {"0": {"memory_free": ["Exceeds memory_total."]}}
    assert not Agent.objects.exists()


def test_missing_fields_are_named(client, agent_headers):
    response = post(client, {}, agent_headers)
    assert response.status_code == 400
    assert set(response.json()) == {"agent_id", "base_url"}


@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token", "Basic dXNlcjpwYXNz", "Bearer ", "tests-only-agent-token"],
)
def test_a_wrong_or_missing_token_is_a_401_and_writes_nothing(client, authorization):
    headers = {} if authorization is None else {"HTTP_AUTHORIZATION": authorization}
    response = post(client, registration(), headers)

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")
    assert not Agent.objects.exists()


def test_a_wrong_token_wins_over_a_malformed_body(client):
    response = post(client, "{not json", {"HTTP_AUTHORIZATION": "Bearer nope"})
    assert response.status_code == 401


def test_a_staff_session_cannot_register_agents(staff_client):
    response = post(staff_client, registration(), {})
    assert response.status_code == 401
    assert not Agent.objects.exists()


def test_an_agent_that_reports_itself_degraded_registers_but_gets_no_work(client, agent_headers):
    response = post(client, registration(state="DEGRADED"), agent_headers)
    assert response.status_code == 201
    agent = Agent.objects.get()
    assert agent.state == AgentState.DEGRADED
    assert not agent.is_routable
