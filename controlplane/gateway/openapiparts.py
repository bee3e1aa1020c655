"""The building blocks of the OpenAPI description of `/v1` (controlplane.gateway.openapi).

Every operation has the same shape (an API key, parameters, a JSON body, responses) and
every refusal the same error schema; these helpers make each one once, so that the
description reads as the API's own list of operations.
"""

from __future__ import annotations

from typing import Any

ERROR = {"$ref": "#/components/schemas/Error"}


def refusals(*statuses: int) -> dict[str, Any]:
    """An operation's refusals by status, each in the one error shape, with why it is given."""
    reasons = {
        "400": "The body is not valid JSON, or a parameter is missing, of the wrong type or "
        "out of range (`param` names it).",
        "401": "No API key, or a wrong, revoked or expired one.",
        "403": "The key may not use this model.",
        "404": "No such model in the catalog (or it is disabled, or, for `GET /v1/models/{model}`, "
        "the key may not use it).",
        "405": "Another method than the one documented.",
        "413": "The body is larger than GATEWAY_MAX_BODY_BYTES.",
        "429": "The key's requests or tokens per minute are spent; `Retry-After` says when.",
        "503": "No agent can serve the model before the cold-start timeout, or the database "
        "is away; `Retry-After` says when to try again.",
    }
    return {
        str(status): {
            "description": reasons[str(status)],
            "content": {"application/json": {"schema": ERROR}},
        }
        for status in statuses
    }


def operation(
    summary: str,
    responses: dict[str, Any],
    *,
    parameters: list[dict[str, Any]] | None = None,
    body: dict[str, Any] | None = None,
    body_type: str = "application/json",
) -> dict[str, Any]:
    """One operation of `/v1`: each needs an API key (the description itself is no operation
    of its own), and a body, when it takes one, is required."""
    described: dict[str, Any] = {"summary": summary, "security": [{"apiKey": []}]}
    if parameters is not None:
        described["parameters"] = parameters
    if body is not None:
        described["requestBody"] = {"required": True, "content": {body_type: {"schema": body}}}
    described["responses"] = responses
    return described


def object_of(required: list[str], properties: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": properties}


def list_of(schema: str) -> dict[str, Any]:
    """OpenAI's paged list shape, of `schema` objects."""
    return object_of(
        ["object", "data", "has_more"],
        {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {"$ref": f"#/components/schemas/{schema}"}},
            "has_more": {"type": "boolean"},
            "first_id": {"type": "string", "nullable": True},
            "last_id": {"type": "string", "nullable": True},
        },
    )


def error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": ERROR}}}


def ok(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def path_id(name: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": schema if schema is not None else {"type": "string"},
    }


def query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }
