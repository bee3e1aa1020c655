"""What the gateway makes of an agent's answers to an adapter's request: which say "another
replica may serve" (not marked), which are the replica's fault, which the client's."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from agents.faults import Fault
from agents.models import Agent, Model, Placement
from controlplane.gateway import upstream
from controlplane.gateway.state import current
from controlplane.gateway.upstream import AgentRefusal, ReplicaFailed
from nodeagent.protocol import AGENT_ERROR_HEADER, AdapterRef, error_body

ADAPTER = AdapterRef("org/tiny-sql", "azure://models/org/tiny-sql", "2")


@pytest.fixture
async def agent():
    """A stand-in agent that answers with the error its path names, echoing the headers."""
    seen: list[dict[str, str]] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        code, status = request.match_info["code"], int(request.match_info["status"])
        return web.json_response(
            error_body(code, f"{code} here", "org/tiny"), status=status,
            headers={AGENT_ERROR_HEADER: code},
        )  # fmt: skip

    async def silent(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        await asyncio.sleep(5)  # no headers for a while: a batch request waiting for room
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/models/org/tiny/{code}/{status}/v1/chat/completions", answer)
    app.router.add_post("/models/org/tiny/silent/v1/chat/completions", silent)
    server = TestServer(app)
    await server.start_server()
    yield server, seen
    await server.close()
    await current().close()


def placement(url: str) -> Placement:
    agent = Agent(agent_id="gpu-a", base_url=url, credential_nonce="n" * 64)
    return Placement(agent=agent, model=Model(model_id="org/tiny"), inference_endpoint_url=url)


async def outcome(agent, code: str, status: int) -> AgentRefusal | Fault:
    server, _ = agent
    url = str(server.make_url(f"/models/org/tiny/{code}/{status}"))
    answer = await upstream.post(
        current().agents, placement(url), "chat/completions", b"{}", False, 10, ADAPTER
    )
    try:
        refused = await upstream.refusal(answer)
    except ReplicaFailed as failure:
        return failure.fault
    assert refused is not None
    return refused


@pytest.mark.parametrize(
    ("code", "status", "expected"),
    [
        ("adapters_busy", 503, Fault.NO_ROOM),  # every slot serves: try another, mark nothing
        ("adapter_unavailable", 503, Fault.NO_ROOM),
        ("cache_full", 507, Fault.NO_ROOM),
        ("lora_disabled", 409, Fault.NO_LORA),
        ("engine_unreachable", 502, Fault.NOT_SERVING),  # the replica's fault: marked
        ("model_not_ready", 503, Fault.NOT_SERVING),
        ("engine_busy", 503, Fault.BUSY),  # a batch request without room: not marked
    ],
)
async def test_replica_answers_are_faults(agent, code, status, expected):
    assert await outcome(agent, code, status) == expected


@pytest.mark.parametrize(
    ("code", "status"),
    [("adapter_checksum_mismatch", 502), ("adapter_rank_too_high", 422),
     ("adapter_load_failed", 422), ("adapter_model_not_found", 404)],
)  # fmt: skip
async def test_the_adapters_own_failures_are_the_clients_answer(agent, code, status):
    refused = await outcome(agent, code, status)
    assert isinstance(refused, AgentRefusal)
    assert (refused.status, refused.code) == (status, code)


async def test_the_adapter_travels_in_headers(agent):
    await outcome(agent, "adapters_busy", 503)
    _, seen = agent
    assert seen[-1]["X-Llmfleet-Adapter"] == "org/tiny-sql"
    assert seen[-1]["X-Llmfleet-Adapter-Source"] == "azure://models/org/tiny-sql"
    assert seen[-1]["X-Llmfleet-Adapter-Revision"] == "2"


def test_a_client_is_told_an_agent_s_refusal_without_its_insides(caplog):
    """An agent's message may name stores, paths and hosts: the client gets the code and the
    request id, the operators' log the message."""
    from types import SimpleNamespace

    from controlplane.gateway.job import refusal_told

    job = SimpleNamespace(model=Model(model_id="org/tiny-sql"), request_id="req_abc")
    inside = "checksum of /nvme/cache/org/tiny-sql from azure://models/org/tiny-sql differs"
    told = refusal_told(job, AgentRefusal(502, "adapter_checksum_mismatch", inside))
    assert told == (
        "The LoRA adapter `org/tiny-sql` could not be loaded (adapter_checksum_mismatch). "
        "Request id req_abc."
    )
    assert inside in caplog.text
    assert "azure://" not in refusal_told(job, AgentRefusal(413, "body_too_large", inside))


@pytest.mark.parametrize(("priority_class", "fault"),
                         [("batch", Fault.BUSY), ("interactive", Fault.NOT_SERVING)])  # fmt: skip
async def test_a_batch_stream_held_for_room_is_no_verdict_on_its_replica(
    agent, priority_class, fault
):
    server, _ = agent
    url = str(server.make_url("/models/org/tiny/silent"))
    with pytest.raises(ReplicaFailed) as failed:
        await upstream.post(
            current().agents, placement(url), "chat/completions", b"{}", True, 0.3, None,
            priority_class,
        )  # fmt: skip
    assert failed.value.fault == fault


async def test_a_batch_class_request_says_so_to_the_agent(agent):
    server, seen = agent
    url = str(server.make_url("/models/org/tiny/engine_busy/503"))
    for priority_class in ("batch", "interactive", None):
        answer = await upstream.post(
            current().agents, placement(url), "chat/completions", b"{}", False, 10, None,
            priority_class, 3,
        )  # fmt: skip
        answer.release()
    assert [headers.get("X-Llmfleet-Priority-Class") for headers in seen[-3:]] == [
        "batch",
        None,
        None,
    ]
    assert {headers.get("X-Llmfleet-Sequences") for headers in seen[-3:]} == {"3"}
