"""The lean /v1 handler: Django's views and errors, no middleware, healthy connections."""

from __future__ import annotations

import json

import pytest
from channels.testing import HttpCommunicator
from django.db import connection

from controlplane.asgi import application
from controlplane.gateway.handler import _drop_broken_connections
from tests.factories import ModelFactory, make_api_key

pytestmark = pytest.mark.django_db(transaction=True)


async def get(path: str, headers: list[tuple[bytes, bytes]]) -> dict:
    return await HttpCommunicator(application, "GET", path, headers=headers).get_response()


async def test_v1_answers_through_the_lean_handler_without_middleware_headers():
    from asgiref.sync import sync_to_async

    await sync_to_async(ModelFactory)(model_id="org/m")
    _, raw_key = await sync_to_async(make_api_key)()
    ok = await get("/v1/models", [(b"authorization", f"Bearer {raw_key}".encode())])
    assert ok["status"] == 200
    assert [m["id"] for m in json.loads(ok["body"])["data"]] == ["org/m"]
    headers = {name.lower() for name, _ in ok["headers"]}
    assert b"x-content-type-options" not in headers  # no SecurityMiddleware here
    refused = await get("/v1/models", [])
    assert refused["status"] == 401
    assert json.loads(refused["body"])["error"]["code"] == "missing_api_key"
    # The rest of the site keeps the full stack.
    site = await get("/healthz", [])
    assert b"x-content-type-options" in {name.lower() for name, _ in site["headers"]}
    # The handler's ORM thread keeps its connection (handler.py); the test database must
    # not see it at teardown.
    await sync_to_async(lambda: connection.close())()


def test_a_connection_that_failed_is_closed_for_the_next_query(monkeypatch):
    connection.ensure_connection()
    connection.errors_occurred = True
    monkeypatch.setattr(connection, "is_usable", lambda: False)
    _drop_broken_connections()
    assert connection.connection is None
    assert connection.errors_occurred is False
