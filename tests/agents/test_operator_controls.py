"""Operators load and step down models from the admin and the fleet API."""

from __future__ import annotations

import json

import pytest
from django.urls import reverse

from agents import actions
from agents.actions import steps
from agents.choices import AgentState, CacheLevel, LoadEventKind, LoadTrigger, PlacementState
from agents.models import LoadEvent, Placement
from tests.factories import GIB, AgentFactory, ModelFactory, PlacementFactory

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def queued(monkeypatch):
    sent: list[tuple[str, tuple[object, ...]]] = []
    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: sent.append((name, args)))
    return sent


def post(client, url, body=None):
    return client.post(url, data=json.dumps(body or {}), content_type="application/json")


def test_the_api_loads_onto_a_chosen_agent_or_the_best_one(staff_client, queued):
    model = ModelFactory(model_id="org/m")
    AgentFactory(agent_id="a1")
    AgentFactory(agent_id="a2", gpu_memory_free=70 * GIB)  # more room: the best
    chosen = post(staff_client, "/api/models/org/m/load/", {"agent": "a1"})
    assert chosen.status_code == 202
    assert (chosen.json()["agent"], chosen.json()["state"]) == ("a1", PlacementState.DOWNLOADING)
    assert LoadEvent.objects.get(agent__agent_id="a1").trigger == LoadTrigger.OPERATOR
    # The same order again joins the load under way.
    assert post(staff_client, "/api/models/org/m/load/", {"agent": "a1"}).json()["agent"] == "a1"
    assert LoadEvent.objects.count() == 1
    # Without an agent: as a cold request would, and a load under way already counts.
    assert post(staff_client, "/api/models/org/m/load/").json()["agent"] == "a1"
    assert len(queued) == 1
    assert post(staff_client, "/api/models/org/m/load/", {"agent": "zz"}).status_code == 404
    assert post(staff_client, "/api/models/org/none/load/").status_code == 404
    del model


def test_the_api_refuses_a_load_no_agent_can_take(staff_client):
    ModelFactory(model_id="org/m")
    AgentFactory(agent_id="a1", state=AgentState.DRAINING)
    response = post(staff_client, "/api/models/org/m/load/", {"agent": "a1"})
    assert response.status_code == 409
    assert "no agent that takes new work" in response.json()["detail"]


def test_an_order_beyond_max_replicas_is_refused_saying_what_to_raise(staff_client, queued):
    """The sweep steps replicas beyond max_replicas down (excess): an operator's load that
    would make one is refused at once rather than undone a moment later."""
    model = ModelFactory(model_id="org/m", max_replicas=1)
    PlacementFactory(model=model, agent=AgentFactory(agent_id="a1"))  # READY on a GPU
    AgentFactory(agent_id="a2")
    response = post(staff_client, "/api/models/org/m/load/", {"agent": "a2"})
    assert response.status_code == 409
    assert "raise max_replicas to serve it on a2 too" in response.json()["detail"]
    assert queued == []
    model.max_replicas = 2
    model.save()
    assert post(staff_client, "/api/models/org/m/load/", {"agent": "a2"}).status_code == 202


def test_the_api_steps_a_placement_down(staff_client, queued):
    placement = PlacementFactory()
    url = f"/api/placements/{placement.pk}/unload/"
    assert post(staff_client, url, {"to": "GPU_RESIDENT"}).status_code == 400
    response = post(staff_client, url, {"to": "NVME_CACHED"})
    assert response.status_code == 202
    body = response.json()
    assert (body["kind"], body["to_level"], body["trigger"]) == (
        LoadEventKind.UNLOAD, CacheLevel.NVME_CACHED, LoadTrigger.OPERATOR,
    )  # fmt: skip
    assert queued == [("agents.tasks.unload", (body["id"],))]
    # It is unloading now: a second order waits for the first.
    again = post(staff_client, url, {"to": "NONE"})
    assert again.status_code == 409
    assert "unloading" in again.json()["detail"]


def test_a_placement_cannot_step_up_or_sideways():
    on_disk = PlacementFactory(state=PlacementState.UNLOADED, cache_level=CacheLevel.NVME_CACHED)
    with pytest.raises(actions.CannotStepDown, match="not above DRAM_CACHED"):
        actions.unload(on_disk, CacheLevel.DRAM_CACHED)
    assert actions.unload(on_disk, CacheLevel.NONE).to_level == CacheLevel.NONE


def test_admin_loads_onto_a_chosen_agent_through_an_intermediate_page(staff_client, queued):
    model = ModelFactory()
    agent = AgentFactory()
    AgentFactory(state=AgentState.OFFLINE, agent_id="gone")
    url = reverse("admin:agents_model_changelist")
    chooser = staff_client.post(url, {"action": "load_onto_agent", "_selected_action": [model.pk]})
    assert chooser.status_code == 200
    assert b"Load onto an agent" in chooser.content
    assert b"gone" not in chooser.content  # an OFFLINE agent is not offered
    staff_client.post(url, {"action": "load_onto_agent", "_selected_action": [model.pk],
                            "agent": agent.pk, "apply": "Load"})  # fmt: skip
    placement = Placement.objects.get(model=model)
    assert placement.agent == agent
    assert [name for name, _ in queued] == ["agents.tasks.load"]


def test_admin_steps_placements_down_and_warns_about_those_it_cannot(staff_client, queued):
    ready = PlacementFactory()
    loading = PlacementFactory(state=PlacementState.DOWNLOADING)
    url = reverse("admin:agents_placement_changelist")
    response = staff_client.post(
        url,
        {"action": "to_local_disk", "_selected_action": [ready.pk, loading.pk]},
        follow=True,
    )
    assert b"wait for it" in response.content
    assert Placement.objects.get(pk=ready.pk).state == PlacementState.UNLOADING
    assert Placement.objects.get(pk=loading.pk).state == PlacementState.DOWNLOADING
    assert len(queued) == 1
