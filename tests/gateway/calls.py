"""Calling /v1 with Django's test client, and reading its OpenAI-shaped refusals."""

from __future__ import annotations

import json
from typing import Any


def post(client: Any, raw_key: str, url: str, body: object) -> Any:
    """POST `body` (an object as JSON, or a string or bytes as they are) with the key."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return client.post(
        url, data=data, content_type="application/json", HTTP_AUTHORIZATION=f"Bearer {raw_key}"
    )


def error_of(response: Any, status: int) -> dict[str, Any]:
    """The OpenAI error of a refusal with `status`, after checking its shape."""
    assert response.status_code == status, response.content
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error
