"""API-key authentication of `/v1/*` requests."""

from __future__ import annotations

from dataclasses import dataclass

from django.http import HttpRequest, JsonResponse
from django.utils import timezone

from controlplane.gateway.cache import key_for_secret
from controlplane.gateway.errors import openai_error
from controlplane.gateway.models import ApiKey


@dataclass(frozen=True)
class AuthFailure:
    response: JsonResponse


async def authenticate(request: HttpRequest) -> ApiKey | AuthFailure:
    """The request's active API key, or the 401 to answer with."""
    scheme, _, raw_key = request.headers.get("Authorization", "").partition(" ")
    raw_key = raw_key.strip()
    if scheme.lower() != "bearer" or not raw_key:
        return AuthFailure(
            openai_error(
                401,
                "Missing API key: send it as 'Authorization: Bearer <key>'.",
                code="missing_api_key",
            )
        )
    key = await key_for_secret(raw_key)
    if key is None:
        return AuthFailure(openai_error(401, "Incorrect API key provided.", code="invalid_api_key"))
    reason = key.inactive_reason(timezone.now())
    if reason is not None:
        return AuthFailure(
            openai_error(401, f"This API key has been {reason}.", code=f"{reason}_api_key")
        )
    return key
