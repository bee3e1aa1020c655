"""The verified holes of least privilege, against the real web process (uvicorn) and
PostgreSQL: a staff user with no permissions, an operator, and a model with an adapter."""

from __future__ import annotations

import pytest
import requests

from agents.models import Model
from tests.e2e.gateway_support import web_process
from tests.factories import ModelFactory, make_role_user

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PASSWORD = "correct horse battery staple"


def test_the_fleet_api_holds_people_to_their_permissions_and_deletes_cleanly(settings, tmp_path):
    base = ModelFactory(model_id="llmfleet/tiny")
    ModelFactory(model_id="llmfleet/tiny-sql", base=base, adapter_rank=8)
    make_role_user("nobody")  # staff, and no permission at all
    make_role_user("op", "Fleet operator")
    with web_process(settings, tmp_path) as (url, _):
        model_url = f"{url}/api/models/llmfleet/tiny/"

        def call(user: str, method: str, body: object = None) -> requests.Response:
            return requests.request(method, model_url, json=body, auth=(user, PASSWORD), timeout=10)

        # The verified hole: is_staff alone PATCHed the engine onto every interface.
        hostile = {"engine_args": ["--host", "0.0.0.0", "--trust-remote-code"]}  # noqa: S104
        assert call("nobody", "PATCH", hostile).status_code == 403
        assert call("nobody", "GET").status_code == 403
        refused = call("op", "PATCH", hostile)
        assert refused.status_code == 400
        assert "--host is not allowed" in " ".join(refused.json()["engine_args"])
        assert call("op", "PATCH", {"trust_remote_code": True}).status_code == 403
        # The other: deleting a base with an adapter answered 500 (ProtectedError).
        conflict = call("op", "DELETE")
        assert conflict.status_code == 409
        assert "llmfleet/tiny-sql" in conflict.json()["detail"]
    assert Model.objects.get(model_id="llmfleet/tiny").engine_args == []
