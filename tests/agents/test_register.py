from __future__ import annotations

import json
from typing import Any

import pytest
from django.test import Client

from agents import actions
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
    answer = response.json()
    credential = answer.pop("credential")
    assert answer == {
        "agent_id": "gpu-a1.eu-west",
        "created": True,
        "state": "IDLE",
        "heartbeat_interval_seconds": 5,
        "contract": CONTRACT_VERSION,
    }
    agent = Agent.objects.get(agent_id="gpu-a1.eu-west")
    # Issued once; the database keeps neither it nor anything it could be read back from.
    assert agent.credential == credential
    assert credential.startswith("lfa_")
    assert credential not in {agent.credential_nonce, agent.credential_fingerprint}
    assert agent.base_url == "http://10.0.0.7:8100"
    assert (agent.gpu_name, agent.gpu_count, agent.gpu_memory_total) == (
        "NVIDIA H100 80GB HBM3",
        1,
        80 * GIB,
    )
    assert agent.gpus[0]["uuid"] == "GPU-abc"
    assert agent.labels == {"zone": "eu-west-1a"}
    assert agent.last_heartbeat_at is not None


def enrol(client: Client, agent_headers: dict[str, str], **overrides: object) -> dict[str, str]:
    """Enrol an agent with the enrolment token: the headers it registers with from then on."""
    response: Any = post(client, registration(**overrides), agent_headers)
    assert response.status_code in (200, 201), response.json()
    return {"HTTP_AUTHORIZATION": f"Bearer {response.json()['credential']}"}


def test_registering_again_updates_the_same_row(client, agent_headers):
    own = enrol(client, agent_headers)
    Agent.objects.filter(agent_id="gpu-a1.eu-west").update(
        state=AgentState.OFFLINE, heartbeat_failures=7
    )

    response = post(client, registration(base_url="http://10.0.0.8:8100", version="0.2.0"), own)

    assert response.status_code == 200
    assert response.json()["created"] is False
    assert "credential" not in response.json()
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


def test_the_enrolment_token_cannot_take_over_an_enrolled_agent(client, agent_headers):
    own = enrol(client, agent_headers)
    assert post(client, registration(), own).status_code == 200  # it has used its credential
    hijack = registration(base_url="http://10.9.9.9:8100")
    response = post(client, hijack, agent_headers)
    assert response.status_code == 403
    assert "registers with its own credential" in response.json()["detail"]
    assert Agent.objects.get().base_url == "http://10.0.0.7:8100"


def test_an_agent_speaks_only_for_its_own_agent_id(client, agent_headers):
    own = enrol(client, agent_headers)
    enrol(client, agent_headers, agent_id="gpu-b2")
    response = post(client, registration(agent_id="gpu-b2", base_url="http://10.6.6.6:1"), own)
    assert response.status_code == 403
    assert Agent.objects.get(agent_id="gpu-b2").base_url == "http://10.0.0.7:8100"


def test_a_revoked_agent_is_refused_until_an_operator_allows_it_to_enrol_again(
    client, agent_headers
):
    own = enrol(client, agent_headers)
    agent = actions.revoke_agent_credential("gpu-a1.eu-west")
    assert agent.state == AgentState.OFFLINE
    assert post(client, registration(), own).status_code == 401
    refused = post(client, registration(), agent_headers)
    assert refused.status_code == 403
    assert "revoked" in refused.json()["detail"]
    actions.allow_enrolment("gpu-a1.eu-west")
    again = enrol(client, agent_headers)
    assert again != own
    assert post(client, registration(), again).status_code == 200


@pytest.mark.parametrize(
    ("base_url", "refusal"),
    [
        ("http://169.254.169.254:80", "link-local or cloud metadata"),
        ("http://[fe80::1]:8100", "link-local"),
        ("http://[::ffff:169.254.169.254]:80", "link-local"),
        ("http://metadata.google.internal", "metadata service"),
        ("http://[fd00:ec2::254]", "metadata"),
        ("http://0.0.0.0:8100", "not a host address"),
        ("http://224.0.0.1:8100", "not a host address"),
    ],
)
def test_base_urls_on_link_local_or_metadata_addresses_are_refused(
    client, agent_headers, base_url, refusal
):
    response = post(client, registration(base_url=base_url), agent_headers)
    assert response.status_code == 400
    assert refusal in " ".join(response.json()["base_url"])
    assert not Agent.objects.exists()


def test_loopback_and_private_ranges_are_refused_when_the_settings_say_so(
    client, agent_headers, settings
):
    assert (
        post(client, registration(base_url="http://127.0.0.1:8100"), agent_headers).status_code
        == 201
    )
    Agent.objects.all().delete()
    settings.AGENT_ALLOW_LOOPBACK = settings.AGENT_ALLOW_PRIVATE_NETWORKS = False
    refused = [("http://127.0.0.1:8100", "loopback"), ("http://localhost:8100", "loopback"),
               ("http://10.0.0.7:8100", "private")]  # fmt: skip
    for url, refusal in refused:
        response = post(client, registration(base_url=url), agent_headers)
        assert response.status_code == 400, url
        assert refusal in " ".join(response.json()["base_url"])
    assert (
        post(client, registration(base_url="http://8.8.8.8:8100"), agent_headers).status_code == 201
    )


def test_an_enrolment_whose_answer_was_lost_may_enrol_again_until_the_credential_is_used(
    client, agent_headers
):
    lost = enrol(client, agent_headers)  # the agent never got this answer
    again = enrol(client, agent_headers)
    assert again != lost
    assert post(client, registration(), lost).status_code == 401  # the lost one is void
    assert post(client, registration(), again).status_code == 200  # used: confirmed
    assert post(client, registration(), agent_headers).status_code == 403
