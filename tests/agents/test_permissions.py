"""Least privilege for people: every fleet API write and admin action needs its Django
permission; the read-only and operator roles are groups made by a migration."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth.models import Group
from django.test import Client
from django.urls import reverse

from agents.choices import AgentState
from agents.models import Agent, Model
from tests.factories import (
    AgentFactory,
    LoadEventFactory,
    ModelFactory,
    PlacementFactory,
    make_role_user,
)

pytestmark = pytest.mark.django_db

VIEWER, OPERATOR = "Fleet viewer", "Fleet operator"


def client_for(user) -> Client:
    client = Client()
    client.force_login(user)
    return client


def send(client: Client, method: str, url: str, body: object = None):
    data = json.dumps(body) if body is not None else ""
    return getattr(client, method)(url, data=data, content_type="application/json")


@pytest.fixture
def fleet():
    model = ModelFactory(model_id="llmfleet/tiny")
    placement = PlacementFactory(model=model, agent=AgentFactory(agent_id="a1"))
    return model, placement


def writes(placement) -> list[tuple[str, str, object]]:
    url = "/api/models/llmfleet/tiny/"
    return [
        ("post", "/api/models/", {"model_id": "x", "source": "azure://c/x"}),
        ("patch", url, {"engine_args": ["--dtype", "float32"]}),
        ("put", url, {"model_id": "llmfleet/tiny", "source": "azure://c/y"}),
        ("delete", url, None),
        ("post", f"{url}load/", {}),
        ("post", "/api/agents/a1/drain/", None),
        ("post", "/api/agents/a1/undrain/", None),
        ("post", f"/api/placements/{placement.pk}/unload/", {"to": "NONE"}),
    ]


def test_the_roles_exist_after_migrating():
    assert set(Group.objects.values_list("name", flat=True)) >= {VIEWER, OPERATOR}
    operator = set(Group.objects.get(name=OPERATOR).permissions.values_list("codename", flat=True))
    assert {"change_model", "manage_agent_credentials", "view_loadevent"} <= operator
    assert "trust_remote_code" not in operator
    viewer = set(Group.objects.get(name=VIEWER).permissions.values_list("codename", flat=True))
    assert viewer
    assert all(codename.startswith("view_") for codename in viewer)
    # Both see what later migrations added: files and batches.
    assert {"view_batch", "view_storedfile", "view_batchoutcome"} <= viewer & operator


def test_a_viewer_reads_everything_and_writes_nothing(fleet):
    _, placement = fleet
    client = client_for(make_role_user("viewer", VIEWER))
    for url in ("/api/agents/", "/api/models/", "/api/placements/", "/api/agents/a1/"):
        assert client.get(url).status_code == 200, url
    for method, url, body in writes(placement):
        assert send(client, method, url, body).status_code == 403, (method, url)
    model = Model.objects.get()
    assert model.engine_args == []
    assert Agent.objects.get().drained_at is None


def test_staff_without_permissions_can_neither_read_nor_write(fleet):
    """The verified hole: is_staff alone PATCHed engine_args (IsAdminUser ignores perms)."""
    client = client_for(make_role_user("nobody"))
    assert client.get("/api/models/").status_code == 403
    response = send(
        client, "patch", "/api/models/llmfleet/tiny/",
        {"engine_args": ["--host", "0.0.0.0", "--trust-remote-code"]},  # noqa: S104
    )  # fmt: skip
    assert response.status_code == 403
    assert Model.objects.get().engine_args == []


def test_an_operator_changes_the_catalog_and_drains_agents(fleet):
    client = client_for(make_role_user("op", OPERATOR))
    patched = send(client, "patch", "/api/models/llmfleet/tiny/", {"max_replicas": 3})
    assert patched.status_code == 200, patched.json()
    assert send(client, "post", "/api/agents/a1/drain/").status_code == 200


def test_trust_remote_code_needs_its_own_permission(fleet):
    url = "/api/models/llmfleet/tiny/"
    operator = client_for(make_role_user("op", OPERATOR))
    refused = send(operator, "patch", url, {"trust_remote_code": True})
    assert refused.status_code == 403
    assert "trust_remote_code" in refused.json()["detail"]
    assert not Model.objects.get().trust_remote_code
    # Sending the value it already has is no change: an operator's full PUT still works.
    same = send(operator, "patch", url, {"trust_remote_code": False, "max_replicas": 2})
    assert same.status_code == 200

    trusted = client_for(make_role_user("lead", OPERATOR, "agents.trust_remote_code"))
    assert send(trusted, "patch", url, {"trust_remote_code": True}).status_code == 200
    assert Model.objects.get().trust_remote_code


def test_engine_flags_that_bind_elsewhere_or_run_code_are_refused_for_everyone(staff_client):
    ModelFactory(model_id="m")
    response = send(
        staff_client, "patch", "/api/models/m/",
        {"engine_args": ["--host", "0.0.0.0", "--trust-remote-code", "--max-model-len", "512"]},  # noqa: S104
    )  # fmt: skip
    assert response.status_code == 400
    problems = " ".join(response.json()["engine_args"])
    assert "--host is not allowed" in problems
    assert "--trust-remote-code is not allowed" in problems
    assert Model.objects.get().engine_args == []


@pytest.mark.parametrize(
    ("changelist", "action"),
    [
        ("admin:agents_agent_changelist", "drain"),
        ("admin:agents_agent_changelist", "revoke_credential"),
        ("admin:agents_agent_changelist", "rotate_credential"),
        ("admin:agents_model_changelist", "load_where_soonest"),
        ("admin:agents_placement_changelist", "to_nothing"),
        ("admin:gateway_apikey_changelist", "revoke"),
    ],
)
def test_a_viewer_sees_no_write_action_in_the_admin_and_cannot_post_one(fleet, changelist, action):
    client = client_for(make_role_user("viewer", VIEWER))
    page = client.get(reverse(changelist))
    assert page.status_code == 200
    assert f'value="{action}"' not in page.content.decode()
    agent = Agent.objects.get()
    client.post(reverse(changelist), {"action": action, "_selected_action": [agent.pk]})
    agent.refresh_from_db()
    assert agent.state != AgentState.OFFLINE
    assert agent.drained_at is None
    assert agent.credential_revoked_at is None


def test_the_operator_sees_the_actions_of_its_role(fleet):
    page = client_for(make_role_user("op", OPERATOR)).get(reverse("admin:agents_agent_changelist"))
    html = page.content.decode()
    assert 'value="drain"' in html
    assert 'value="revoke_credential"' in html


def test_trust_remote_code_is_read_only_in_the_admin_without_its_permission(fleet):
    model, _ = fleet
    url = reverse("admin:agents_model_change", args=[model.pk])
    operator = client_for(make_role_user("op", OPERATOR))
    assert 'name="trust_remote_code"' not in operator.get(url).content.decode()
    lead = client_for(make_role_user("lead", OPERATOR, "agents.trust_remote_code"))
    assert 'name="trust_remote_code"' in lead.get(url).content.decode()


def test_the_dashboard_needs_the_permission_to_view_agents():
    assert client_for(make_role_user("nobody")).get("/dashboard/").status_code == 403
    assert client_for(make_role_user("viewer", VIEWER)).get("/dashboard/").status_code == 200


def test_a_trusted_model_s_checkpoint_is_the_trust_permission_s_to_change(fleet):
    """Pointing a model that runs its checkpoint's code at another checkpoint would run that
    one's code: the same permission as the flag itself."""
    Model.objects.filter(model_id="llmfleet/tiny").update(trust_remote_code=True)
    url = "/api/models/llmfleet/tiny/"
    operator = client_for(make_role_user("op", OPERATOR))
    changes = [
        {"source": "azure://models/other"},
        {"revision": "evil"},
        {"mirrors": [{"uri": "s3://models-mirror/other", "labels": {}}]},
    ]
    for change in changes:
        assert send(operator, "patch", url, change).status_code == 403, change
    assert send(operator, "patch", url, {"max_replicas": 2}).status_code == 200  # the rest: ok
    lead = client_for(make_role_user("lead", OPERATOR, "agents.trust_remote_code"))
    assert send(lead, "patch", url, {"source": "azure://models/other"}).status_code == 200
    page = operator.get(reverse("admin:agents_model_change", args=[Model.objects.get().pk]))
    assert 'name="source"' not in page.content.decode()


def test_an_operator_deletes_a_model_in_the_admin_however_much_history_it_has(fleet, monkeypatch):
    from agents.actions import steps

    monkeypatch.setattr(steps, "queue", lambda name, *args, **_: None)
    model, placement = fleet
    LoadEventFactory(model=model, agent=placement.agent, placement=placement)
    client = client_for(make_role_user("op", OPERATOR))
    url = reverse("admin:agents_model_delete", args=[model.pk])
    assert client.get(url).status_code == 200
    client.post(url, {"post": "yes"})
    assert not Model.objects.exists()


def test_a_base_with_adapters_is_not_deleted_in_the_admin_and_says_why(fleet):
    model, _ = fleet
    ModelFactory(model_id="llmfleet/tiny-sql", base=model, adapter_rank=8)
    client = client_for(make_role_user("op", OPERATOR))
    page = client.get(reverse("admin:agents_model_delete", args=[model.pk]))
    assert "llmfleet/tiny-sql" in page.content.decode()  # named as what stands in the way
    client.post(reverse("admin:agents_model_delete", args=[model.pk]), {"post": "yes"})
    assert Model.objects.filter(model_id="llmfleet/tiny").exists()
