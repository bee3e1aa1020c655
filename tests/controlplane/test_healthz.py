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


def test_metrics_are_exposed_for_prometheus(client, settings):
    client.get("/healthz")
    body = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {settings.AGENT_TOKEN}")
    assert "django_http_requests_total_by_view_transport_method_total" in body.content.decode()


def test_metrics_name_the_fleet_only_to_a_scraper_with_the_token(client, staff_client, settings):
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    settings.METRICS_TOKEN = "scrape-token"
    assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-token").status_code == 200
    # Once a token of its own is set, the agent token no longer scrapes the control plane.
    refused = client.get("/metrics", HTTP_AUTHORIZATION=f"Bearer {settings.AGENT_TOKEN}")
    assert refused.status_code == 401
    assert staff_client.get("/metrics").status_code == 200  # an operator's browser


@pytest.mark.django_db
def test_scrapes_in_quick_succession_read_the_database_once(django_assert_num_queries):
    from controlplane.metrics import FleetCollector

    collector = FleetCollector()
    list(collector.collect())
    with django_assert_num_queries(0):
        list(collector.collect())
