"""OpenAI-shaped error responses: `{"error": {"message", "type", "param", "code"}}`.

OpenAI's SDKs read these fields to build their exceptions, so every error of
`/v1/*` uses this shape, including 404s and 405s of unknown routes.
"""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse

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
