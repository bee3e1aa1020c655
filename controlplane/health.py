"""`/healthz`: whether this web process can reach what it depends on. It answers anyone (load
balancers, probes), so it says which dependency failed, never how: the exception's text
(hosts, users, driver messages) goes to the log."""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

log = logging.getLogger(__name__)

# A health check that hangs is worse than one that fails: load balancers time out first.
_REDIS_TIMEOUT_SECONDS = 1.0


def _check_database() -> str | None:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    except Exception:
        log.exception("healthz: the database does not answer")
        return "unreachable"
    return None


def _check_redis() -> str | None:
    client = redis.Redis.from_url(
        settings.REDIS_URL,
        socket_timeout=_REDIS_TIMEOUT_SECONDS,
        socket_connect_timeout=_REDIS_TIMEOUT_SECONDS,
    )
    try:
        client.ping()
    except redis.RedisError:
        log.exception("healthz: Redis does not answer")
        return "unreachable"
    finally:
        client.close()
    return None


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """200 when every configured dependency answers; 503 naming each one that does not."""
    checks = {"database": _check_database()}
    if settings.REDIS_URL:
        checks["redis"] = _check_redis()
    failed = sorted(name for name, error in checks.items() if error)
    body: dict[str, object] = {
        "status": "error" if failed else "ok",
        "checks": {name: error or "ok" for name, error in checks.items()},
    }
    if failed:
        body["failed"] = failed
    return JsonResponse(body, status=503 if failed else 200)
