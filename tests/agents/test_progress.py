"""Load progress pushed by agents (`POST /api/agents/<id>/progress`): what it may move, who
may send it, and what bad input gets."""

from __future__ import annotations

import json

import pytest

from agents import actions
from agents.choices import CacheLevel, PlacementState
from agents.models import Placement
from nodeagent.protocol import CacheLevel as ProtocolLevel
from nodeagent.protocol import LoadProgress, ModelState, ModelStatus
from tests.factories import AgentFactory, PlacementFactory

pytestmark = pytest.mark.django_db


def status(model_id: str, state: ModelState, phase: str, done: int = 0, total: int = 0):
    return ModelStatus(model_id=model_id, cache_state=state, cache_level=ProtocolLevel.NONE,
                       bytes_done=done, bytes_total=total, phase=phase)  # fmt: skip


def loading(state: PlacementState = PlacementState.DOWNLOADING) -> Placement:
    return PlacementFactory.create(
        state=state, cache_level=CacheLevel.NONE, inference_endpoint_url=""
    )


def post(client, agent_id: str, body, credential: str):
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(f"/api/agents/{agent_id}/progress", data=data,
                       content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {credential}")  # fmt: skip


def test_a_download_that_finished_moves_the_placement_to_the_engine_start():
    placement = loading()
    model_id = placement.model.model_id
    actions.record_progress(placement.agent, [status(model_id, ModelState.DOWNLOADING,
                                                     "downloading", 5, 10)])  # fmt: skip
    placement.refresh_from_db()
    assert (placement.state, placement.bytes_done, placement.phase) == (
        PlacementState.DOWNLOADING, 5, "downloading"
    )  # fmt: skip
    actions.record_progress(
        placement.agent,
        [status(model_id, ModelState.LOADING_TO_GPU, "starting the engine (standby)", 10, 10)],
    )
    placement.refresh_from_db()
    assert (placement.state, placement.phase) == (
        PlacementState.LOADING_TO_GPU, "starting the engine (standby)"
    )  # fmt: skip


def test_a_report_never_ends_a_load_nor_goes_back_nor_touches_a_ready_replica():
    placement = loading(PlacementState.LOADING_TO_GPU)
    model_id = placement.model.model_id
    # READY is the load's answer to say (with its endpoint), never a progress report's.
    assert actions.record_progress(placement.agent,
                                   [status(model_id, ModelState.READY, "")]) == 0  # fmt: skip
    # A report older than what is written: the download is over already.
    older = status(model_id, ModelState.DOWNLOADING, "downloading", 1, 10)
    assert actions.record_progress(placement.agent, [older]) == 0
    placement.refresh_from_db()
    assert placement.state == PlacementState.LOADING_TO_GPU
    ready = PlacementFactory(state=PlacementState.READY)
    late = status(ready.model.model_id, ModelState.LOADING_TO_GPU, "starting the engine")
    assert actions.record_progress(ready.agent, [late]) == 0
    ready.refresh_from_db()
    assert (ready.state, ready.phase) == (PlacementState.READY, "")


# The view writes off the request's thread, on a connection of its own: it sees only
# committed rows.
@pytest.mark.django_db(transaction=True)
def test_an_agent_reports_with_its_own_credential_for_itself_only(client, agent_headers):
    placement = loading()
    agent, other = placement.agent, AgentFactory()
    body = LoadProgress(agent_id=agent.agent_id, models=(
        status(placement.model.model_id, ModelState.LOADING_TO_GPU, "starting the engine"),
    )).to_json()  # fmt: skip
    assert post(client, agent.agent_id, body, other.credential).status_code == 403
    enrolment = agent_headers["HTTP_AUTHORIZATION"].removeprefix("Bearer ")
    assert post(client, agent.agent_id, body, enrolment).status_code == 403
    assert post(client, agent.agent_id, body, "lfa_" + "0" * 64).status_code == 401
    placement.refresh_from_db()
    assert placement.state == PlacementState.DOWNLOADING
    response = post(client, agent.agent_id, body, agent.credential)
    assert response.status_code == 204, response.content
    placement.refresh_from_db()
    assert (placement.state, placement.phase) == (
        PlacementState.LOADING_TO_GPU, "starting the engine"
    )  # fmt: skip


# As above: committed rows only.
@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    ("body", "says"),
    [
        ('{"agent_id": ', "malformed"),
        ({"agent_id": "someone-else", "models": []}, "not"),
        ({"models": []}, "agent_id"),
        (
            {
                "agent_id": "X",
                "models": [{"model_id": "m", "cache_state": "NAPPING", "cache_level": "NONE"}],
            },
            "cache_state",
        ),
        ({"agent_id": "X", "models": [], "contract": "2.0"}, "majors differ"),
    ],
)
def test_bad_reports_get_a_400_that_says_why_and_change_nothing(client, body, says):
    placement = loading()
    agent = placement.agent
    if isinstance(body, dict) and body.get("agent_id") == "X":
        body["agent_id"] = agent.agent_id
    response = post(client, agent.agent_id, body, agent.credential)
    assert response.status_code == 400, response.content
    assert says in response.json()["detail"]
    placement.refresh_from_db()
    assert placement.state == PlacementState.DOWNLOADING


# As above: committed rows only.
@pytest.mark.django_db(transaction=True)
def test_an_oversized_report_is_a_413(client):
    agent = AgentFactory()
    body = json.dumps({"agent_id": agent.agent_id, "models": [], "pad": "x" * 300_000})
    assert post(client, agent.agent_id, body, agent.credential).status_code == 413
    assert client.get(f"/api/agents/{agent.agent_id}/progress").status_code == 405
