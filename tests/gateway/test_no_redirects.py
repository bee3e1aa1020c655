"""No HTTP redirect is ever followed between the control plane and an agent: an enrolled
agent answering `303 Location: http://169.254.169.254/...` must not make the web process or
a worker fetch that address, and its body must never reach a client."""

from __future__ import annotations

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agents import agent_client
from agents.faults import Fault
from agents.models import Agent, Model, Placement
from controlplane.gateway import upstream
from controlplane.gateway.state import current
from controlplane.gateway.upstream import ReplicaFailed
from nodeagent.protocol import LoadModelRequest


@pytest.fixture
async def metadata():
    """A stand-in for the cloud's metadata service: it counts who reached it."""
    hits: list[str] = []

    async def secrets(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"AccessKeyId": "leaked"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", secrets)
    server = TestServer(app)
    await server.start_server()
    yield server, hits
    await server.close()


@pytest.fixture
async def redirecting_agent(metadata):
    """An agent that answers every call with a redirect to the metadata service."""
    target = str(metadata[0].make_url("/latest/meta-data/iam/security-credentials/role"))

    async def redirect(request: web.Request) -> web.Response:
        raise web.HTTPSeeOther(target)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", redirect)
    server = TestServer(app)
    await server.start_server()
    yield server
    await server.close()
    await current().close()


@pytest.mark.parametrize("stream", [False, True])
async def test_the_gateway_refuses_an_agent_s_redirect(redirecting_agent, metadata, stream):
    url = str(redirecting_agent.make_url("/models/org/tiny"))
    agent = Agent(agent_id="gpu-a", base_url=url, credential_nonce="n" * 64)
    replica = Placement(agent=agent, model=Model(model_id="org/tiny"), inference_endpoint_url=url)
    with pytest.raises(ReplicaFailed) as failed:
        await upstream.post(current().agents, replica, "chat/completions", b"{}", stream, 10)
    assert failed.value.fault == Fault.UNREACHABLE
    assert "redirect" in str(failed.value)
    assert metadata[1] == []


async def test_the_agent_client_refuses_redirects(redirecting_agent, metadata):
    base = str(redirecting_agent.make_url("")).rstrip("/")
    request = LoadModelRequest(model_id="org/tiny", source="file:///m")
    with pytest.raises(agent_client.AgentCallFailed) as failed:
        await agent_client.load_model(base, "token", request, 5)
    assert failed.value.code == agent_client.CONTRACT_VIOLATION
    with pytest.raises(agent_client.AgentCallFailed):
        await agent_client.forget_credential(base, "token", 5)
    [beat] = await agent_client.poll_heartbeats(
        [agent_client.HeartbeatTarget(1, base, "token")], seconds=5
    )
    assert beat.response is None
    assert beat.rejected
    assert metadata[1] == []
