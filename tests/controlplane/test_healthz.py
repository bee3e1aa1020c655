from __future__ import annotations

import pytest
from django.db.utils import OperationalError

from tests.support import free_port

pytestmark = pytest.mark.django_db


def test_healthy_with_database_and_redis(client, settings):
    assert settings.REDIS_URL, "the tests run against a real Redis"
    response = client.get("/healthz")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "checks": {"database": "ok", "redis": "ok"}}


def test_redis_down_is_503_naming_redis(client, settings):
    settings.REDIS_URL = f"redis://127.0.0.1:{free_port()}/0"
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["failed"] == ["redis"]
    assert body["checks"]["database"] == "ok"
    # Which dependency, never how: the exception's text (hosts, ports) is for the log.
    assert body["checks"]["redis"] == "unreachable"
    assert "127.0.0.1" not in response.content.decode()


def test_without_redis_configured_only_the_database_is_checked(client, settings):
    settings.REDIS_URL = ""
    assert client.get("/healthz").json() == {"status": "ok", "checks": {"database": "ok"}}


def test_database_down_is_503_naming_the_database(client, monkeypatch, caplog):
    def broken_cursor():
        raise OperationalError('connection to "db.internal" (10.1.2.3), user "fleet" refused')

    monkeypatch.setattr("controlplane.health.connection.cursor", broken_cursor)
    response = client.get("/healthz")
    assert response.status_code == 503
    assert response.json()["failed"] == ["database"]
    assert response.json()["checks"]["database"] == "unreachable"
    assert "db.internal" not in response.content.decode()
    assert "db.internal" in caplog.text  # the operators' log has it


def test_healthz_needs_no_login_and_only_reads(client):
    assert client.post("/healthz").status_code == 405


def test_metrics_are_exposed_for_prometheus(client):
    client.get("/healthz")
    body = client.get("/metrics").content.decode()
    assert "django_http_requests_total_by_view_transport_method_total" in body
