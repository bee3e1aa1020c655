"""A heartbeat round where one agent answers outside the contract: only that agent is hit."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
from aiohttp import web
from django.db import DataError

from agents import actions, agent_client
from agents.actions import heartbeats
from agents.choices import AgentState, PlacementState
from agents.models import Agent, Placement
from controlplane.metrics import FleetCollector
from nodeagent.protocol import (
    CONTRACT_VERSION,
    AgentReportedState,
    CacheLevel,
    DiskInfo,
    HeartbeatResponse,
    ModelState,
    ModelStatus,
)
from tests.factories import AgentFactory, ModelFactory

pytestmark = pytest.mark.django_db


def heartbeat_of(agent: Agent, *models: ModelStatus, **extra: object) -> dict:
    body = HeartbeatResponse(
        agent_id=agent.agent_id,
        state=AgentReportedState.INFERRING,
        version="9.9",
        disk=DiskInfo("/c", 9, 9, 0),
        models=models,
        contract=CONTRACT_VERSION,
    ).to_json()
    return body | extra


@contextmanager
def agents_answering(*answers: Callable[[str], dict]) -> Iterator[list[str]]:
    """One HTTP server per answer, answering POST /heartbeat with answer(its own URL)."""
    loop = asyncio.new_event_loop()
    runners: list[web.AppRunner] = []
    urls: list[str] = []

    async def start() -> None:
        for make in answers:
            body: list[bytes] = []  # filled once the port, hence the URL, is known

            async def answer(request: web.Request, body: list[bytes] = body) -> web.Response:
                return web.Response(body=body[0], content_type="application/json")

            app = web.Application()
            app.router.add_post("/heartbeat", answer)
            runner = web.AppRunner(app)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            url = f"http://127.0.0.1:{runner.addresses[0][1]}"
            body.append(json.dumps(make(url)).encode())
            urls.append(url)
            runners.append(runner)

    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(start(), loop).result(10)
    try:
        yield urls
    finally:
        for runner in runners:
            asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)


def poll(*agents: Agent) -> list[agent_client.HeartbeatResult]:
    targets = [
        agent_client.HeartbeatTarget(agent.pk, agent.base_url, agent.credential) for agent in agents
    ]
    return asyncio.run(agent_client.poll_heartbeats(targets, seconds=5))


def test_an_agent_answering_a_wrong_type_is_refused_alone_and_says_why(settings):
    settings.HEARTBEAT_DEGRADED_AFTER = 1
    model = ModelFactory()
    good, bad, newer = AgentFactory(), AgentFactory(), AgentFactory()

    def ready(url: str) -> ModelStatus:
        return ModelStatus(
            model.model_id, ModelState.READY, CacheLevel.GPU_RESIDENT, f"{url}/models/m"
        )

    def broken(url: str) -> dict:
        body = heartbeat_of(bad)
        body["models"] = [{"model_id": model.model_id, "cache_state": "READY",
                           "cache_level": "GPU_RESIDENT", "bytes_done": None}]  # fmt: skip
        return body

    with agents_answering(
        lambda url: heartbeat_of(good, ready(url)),
        broken,
        # one minor version ahead, with a field this side has never heard of
        lambda url: heartbeat_of(newer, ready(url), contract="1.7", power_watts=300),
    ) as urls:
        for agent, url in zip((good, bad, newer), urls, strict=True):
            Agent.objects.filter(pk=agent.pk).update(base_url=url)
            agent.refresh_from_db()
        actions.apply_heartbeats(poll(good, bad, newer))

    for agent in (good, bad, newer):
        agent.refresh_from_db()
    assert (good.state, good.version, good.contract_error) == (AgentState.INFERRING, "9.9", "")
    assert (newer.state, newer.contract_version) == (AgentState.INFERRING, "1.7")
    assert bad.state == AgentState.DEGRADED
    assert "$.models[0].bytes_done" in bad.contract_error
    assert bad.contract_rejections == 1
    assert bad.contract_error_at is not None
    served = Placement.objects.filter(agent__in=[good, newer], state=PlacementState.READY)
    assert served.count() == 2
    assert not Placement.objects.filter(agent=bad).exists()
    rejections = next(
        m for m in FleetCollector().collect() if m.name == "llmfleet_agent_contract_rejections"
    )
    assert {s.labels["agent"]: s.value for s in rejections.samples}[bad.agent_id] == 1


def test_an_endpoint_outside_the_agents_base_url_is_refused(settings):
    """A compromised agent must not point the gateway (and its prompts) elsewhere."""
    model = ModelFactory()
    agent = AgentFactory(base_url="http://gpu-7.internal:8100")
    for elsewhere in ("http://169.254.169.254/latest", "http://gpu-7.internal:8101/models/m",
                      "http://gpu-7.internal:8100/../../x"):  # fmt: skip
        status = ModelStatus(model.model_id, "READY", "GPU_RESIDENT", elsewhere)
        body = HeartbeatResponse(
            agent_id=agent.agent_id, state="IDLE", version="1", disk=DiskInfo("/c", 1, 1, 0),
            models=(status,),
        )  # fmt: skip
        actions.apply_heartbeats([agent_client.HeartbeatResult(agent.pk, time.time(), body)])
        agent.refresh_from_db()
        assert "outside its base URL" in agent.contract_error
    assert not Placement.objects.filter(agent=agent).exists()


def test_an_agent_answering_for_another_agent_id_is_refused():
    agent, other = AgentFactory(), AgentFactory()
    body = HeartbeatResponse(
        agent_id=other.agent_id, state="IDLE", version="1", disk=DiskInfo("/c", 1, 1, 0)
    )
    actions.apply_heartbeats([agent_client.HeartbeatResult(agent.pk, time.time(), body)])
    agent.refresh_from_db()
    assert agent.heartbeat_failures == 1
    assert f"answered as agent {other.agent_id!r}" in agent.contract_error


def test_a_heartbeat_a_column_refuses_holds_back_no_other_agent(monkeypatch):
    """The decoder's bounds match the columns; should one still slip through, the round is
    stored agent by agent and the one that broke it is refused alone."""
    first, second = AgentFactory(), AgentFactory()
    reconcile = heartbeats._reconcile
    model = ModelFactory()

    def column_refuses(placement: Placement, status: ModelStatus, **kwargs: bool) -> None:
        if placement.agent_id == first.pk:
            raise DataError("value too long for type character varying(500)")
        reconcile(placement, status, **kwargs)

    monkeypatch.setattr(heartbeats, "_reconcile", column_refuses)
    results = [
        agent_client.HeartbeatResult(agent.pk, time.time(), HeartbeatResponse(
            agent_id=agent.agent_id, state="INFERRING", version="2",
            disk=DiskInfo("/c", 1, 1, 0), models=(ModelStatus(
                model.model_id, "READY", "GPU_RESIDENT", f"{agent.base_url}/models/m"
            ),),
        ))
        for agent in (first, second)
    ]  # fmt: skip
    actions.apply_heartbeats(results)
    first.refresh_from_db()
    second.refresh_from_db()
    assert (second.state, second.version) == (AgentState.INFERRING, "2")
    assert Placement.objects.get(agent=second).state == PlacementState.READY
    assert "could not be stored" in first.contract_error
    assert first.heartbeat_failures == 1


def test_an_answer_polled_before_a_revocation_does_not_bring_the_agent_back(settings):
    agent = AgentFactory()
    body = HeartbeatResponse(
        agent_id=agent.agent_id, state=AgentReportedState.IDLE, version="1",
        disk=DiskInfo("/c", 1, 1, 0),
    )  # fmt: skip
    polled = agent_client.HeartbeatResult(agent.pk, time.time(), body)
    actions.revoke_agent_credential(agent.agent_id)  # the agent is not reachable: logged
    actions.apply_heartbeats([polled])
    agent.refresh_from_db()
    assert agent.state == AgentState.OFFLINE
    assert agent.heartbeat_failures >= settings.HEARTBEAT_OFFLINE_AFTER
