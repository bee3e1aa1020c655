"""API-key authentication of `/v1/*` requests, before their bodies are read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from django.db import DatabaseError
from django.http import HttpRequest, JsonResponse
from django.utils import timezone

from controlplane import bodylimit
from controlplane.gateway.cache import Cache
from controlplane.gateway.errors import database_away, openai_error
from controlplane.gateway.models import ApiKey

# Where the /v1 handler leaves the key it authenticated from the request's headers alone.
SCOPE_KEY = "llmfleet.api_key"
# /v1 answers without a key: its OpenAPI description.
PUBLIC_PATHS = frozenset({"/v1/openapi.json"})


@dataclass(frozen=True)
class AuthFailure:
    response: JsonResponse


async def authenticate(request: HttpRequest, cache: Cache) -> ApiKey | AuthFailure:
    """The request's active API key, or the 401 to answer with (the /v1 handler found it
    already, before it read the body: `refuse_before_body`)."""
    found = getattr(request, "scope", {}).get(SCOPE_KEY)
    if isinstance(found, ApiKey):
        return found
    return await key_for_header(request.headers.get("Authorization", ""), cache)


async def key_for_header(header: str, cache: Cache) -> ApiKey | AuthFailure:
    """The active API key of an `Authorization` header's value, or the 401 to answer with."""
    scheme, _, raw_key = header.partition(" ")
    raw_key = raw_key.strip()
    if scheme.lower() != "bearer" or not raw_key:
        return AuthFailure(
            openai_error(
                401,
                "Missing API key: send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        )
    key = await cache.key_for_secret(raw_key)
    if key is None:
        return AuthFailure(openai_error(401, "Incorrect API key provided.", code="invalid_api_key"))
    reason = key.inactive_reason(timezone.now())
    if reason is not None:
        return AuthFailure(
            openai_error(401, f"This API key has been {reason}.", code=f"{reason}_api_key")
        )
    return key


async def refuse_before_body(scope: dict[str, Any], cache: Cache) -> JsonResponse | None:
    """The answer to a /v1 request that its headers alone settle, before its body is read:
    401 without an active key, 413 for a declared length over GATEWAY_MAX_BODY_BYTES. A key
    it finds is left in the scope for the view (SCOPE_KEY)."""
    if scope["path"] in PUBLIC_PATHS:
        return None
    headers = dict(reversed(scope["headers"]))  # the first of a repeated header wins
    try:
        key = await key_for_header(headers.get(b"authorization", b"").decode("latin-1"), cache)
    except DatabaseError as exc:  # as a view answers: 503 with Retry-After
        return await database_away(exc)
    if isinstance(key, AuthFailure):
        return key.response
    scope[SCOPE_KEY] = key
    declared = headers.get(b"content-length", b"").strip()
    limit = bodylimit.limit_for(scope["path"])
    if declared.isdigit() and int(declared) > limit:
        return openai_error(
            413, f"The request body exceeds {limit} bytes.", code="request_too_large"
        )
    return None
