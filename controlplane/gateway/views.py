"""The OpenAI-compatible endpoints."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from controlplane.gateway.auth import AuthFailure, authenticate
from controlplane.gateway.errors import openai_error


@csrf_exempt
async def list_models(request: HttpRequest) -> JsonResponse:
    """`GET /v1/models` in OpenAI's list shape."""
    if request.method != "GET":
        return openai_error(405, f"Method {request.method} is not allowed here; use GET.")
    key = await authenticate(request)
    if isinstance(key, AuthFailure):
        return key.response
    data = [
        {
            "id": model.model_id,
            "object": "model",
            "created": int(model.created_at.timestamp()),
            "owned_by": model.owned_by,
        }
        async for model in key.usable_models().order_by("model_id")
    ]
    return JsonResponse({"object": "list", "data": data})
