"""OpenAI-shaped error responses: `{"error": {"message", "type", "param", "code"}}`.

OpenAI's SDKs read these fields to build their exceptions, so every error of
`/v1/*` uses this shape, including 404s and 405s of unknown routes.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, ParamSpec, TypeVar

from django.conf import settings
from django.db import DatabaseError
from django.http import HttpRequest, HttpResponseBase, JsonResponse

log = logging.getLogger(__name__)
P = ParamSpec("P")
R = TypeVar("R", bound=HttpResponseBase)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable",
}


def openai_error(
    status: int, message: str, code: str | None = None, param: str | None = None
) -> JsonResponse:
    error_type = _TYPE_BY_STATUS.get(
        status, "server_error" if status >= 500 else "invalid_request_error"
    )
    body = {"error": {"message": message, "type": error_type, "param": param, "code": code}}
    response = JsonResponse(body, status=status)
    if status == 401:
        response["WWW-Authenticate"] = 'Bearer realm="llmfleet"'
    return response


def not_found(request: HttpRequest, path: str = "") -> JsonResponse:
    """Any `/v1/...` route llmfleet does not serve."""
    return openai_error(
        404, f"Unknown endpoint: {request.method} {request.path}", code="unknown_url"
    )


async def database_away(exc: DatabaseError) -> JsonResponse:
    """503 with Retry-After for a request that needed the database while it is away (a
    restart, a failover); the broken connection is dropped for the next query."""
    from controlplane.gateway.handler import drop_broken_connections

    log.warning("the database is unavailable: %s", exc)
    await drop_broken_connections()
    response = openai_error(
        503, "The service is briefly unavailable; try again.", code="service_unavailable"
    )
    response["Retry-After"] = str(settings.GATEWAY_RETRY_AFTER_SECONDS)
    return response


def openai_errors(
    view: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R | JsonResponse]]:
    """A /v1 view whose unexpected failures still answer in OpenAI's shape: 503 with
    Retry-After while the database is away (a restart, a failover), 500 otherwise."""

    @functools.wraps(view)
    async def wrapped(*args: P.args, **kwargs: P.kwargs) -> R | JsonResponse:
        from controlplane.gateway.handler import REQUEST_ID

        request = args[0] if args else None
        return await answered(
            view(*args, **kwargs), getattr(request, "scope", {}).get(REQUEST_ID, "-")
        )

    return wrapped


async def answered(answer: Awaitable[R], request_id: str) -> R | JsonResponse:
    """`answer`'s response; when it fails unexpectedly, the OpenAI-shaped one (`openai_errors`)."""
    try:
        return await answer
    except DatabaseError as exc:
        return await database_away(exc)
    except Exception:
        log.exception("request %s: a /v1 request failed", request_id)
        return openai_error(500, "The server had an error processing your request.")
