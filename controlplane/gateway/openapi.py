"""The OpenAPI description of `/v1`, served at `GET /v1/openapi.json`.

It describes what the gateway itself checks and answers: the parameters it
validates (`validation.py`), the error shape every refusal has, and the status
codes it uses. Parameters it does not interpret pass to the engine untouched, so
request bodies allow additional properties. `tests/gateway/test_fuzz.py` runs
schemathesis against it. The Files and Batch APIs' part is in `openapibatch.py`, the
shapes every operation shares in `openapiparts.py`.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse

from controlplane.gateway.openapibatch import BATCH_PATHS, FILE_PATHS, SCHEMAS
from controlplane.gateway.openapiparts import error, object_of, ok, operation, path_id, refusals

_NUMBER_PARAMETERS = {
    "max_tokens": {"type": "integer", "minimum": 1},
    "max_completion_tokens": {"type": "integer", "minimum": 1},
    "temperature": {"type": "number", "minimum": 0, "maximum": 2},
    "top_p": {"type": "number", "minimum": 0, "maximum": 1},
    "n": {"type": "integer", "minimum": 1, "maximum": 16},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
}
_COMMON_PARAMETERS = {
    "model": {"type": "string", "minLength": 1, "description": "A catalog model_id."},
    "stream": {"type": "boolean"},
    "stream_options": {"type": "object"},
    "user": {"type": "string", "description": "Keeps a user on one replica."},
    **_NUMBER_PARAMETERS,
}
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {
            "type": "string",
            "enum": ["system", "developer", "user", "assistant", "tool", "function"],
        },
        "content": {"oneOf": [{"type": "string"}, {"type": "array"}]},
    },
}
_TOKEN_IDS = {"type": "array", "items": {"type": "integer"}}
_ANSWER = {
    "description": "The engine's answer, as OpenAI's API gives it; with `stream`, "
    "`text/event-stream` chunks ending with `data: [DONE]`.",
    "content": {
        "application/json": {"schema": {"type": "object"}},
        "text/event-stream": {"schema": {"type": "string"}},
    },
}


def _completion_operation(summary: str, body: dict[str, Any]) -> dict[str, Any]:
    return operation(
        summary, {"200": _ANSWER, **refusals(400, 401, 403, 404, 413, 429, 503)}, body=body
    )


def _stored_response_operation(summary: str) -> dict[str, Any]:
    """llmfleet stores no response (any replica may answer, and an engine's memory goes when
    it is stepped down), so these answer 404 `response_not_found` for every id."""
    return operation(
        summary + " llmfleet stores no responses; the 404's message says why.",
        {
            **refusals(401),
            "404": error("No response is stored under this id (none ever is)."),
        },
        parameters=[path_id("response_id", {"type": "string", "minLength": 1})],
    )


DESCRIPTION: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "llmfleet OpenAI-compatible API",
        "version": "1",
        "description": "What the llmfleet gateway checks and answers; parameters it does not "
        "check pass to the engine (vLLM) untouched.",
    },
    "paths": {
        "/v1/models": {
            "get": operation(
                "The models this key may use, and whether each is warm.",
                {"200": ok("OpenAI's list shape.", "ModelList"), **refusals(401, 503)},
            )
        },
        "/v1/models/{model}": {
            "get": operation(
                "One model this key may use, as listed.",
                {"200": ok("OpenAI's model shape.", "Model"), **refusals(401, 404, 503)},
                parameters=[
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "description": "The model's id; it may contain `/`.",
                        "schema": {"type": "string"},
                    }
                ],
            )
        },
        "/v1/chat/completions": {
            "post": _completion_operation(
                "A chat completion, streamed or not.",
                object_of(
                    ["model", "messages"],
                    {
                        **_COMMON_PARAMETERS,
                        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
                    },
                ),
            )
        },
        "/v1/completions": {
            "post": _completion_operation(
                "A text completion, streamed or not.",
                object_of(
                    ["model", "prompt"],
                    {
                        **_COMMON_PARAMETERS,
                        "prompt": {
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                                {**_TOKEN_IDS, "minItems": 1},
                                {"type": "array", "minItems": 1, "items": _TOKEN_IDS},
                            ]
                        },
                    },
                ),
            )
        },
        "/v1/responses": {
            "post": _completion_operation(
                "A response (OpenAI's Responses API), streamed as typed events or not. "
                "`previous_response_id` and `background` are refused: llmfleet stores no "
                "responses.",
                object_of(
                    ["model", "input"],
                    {
                        "model": _COMMON_PARAMETERS["model"],
                        "stream": {"type": "boolean"},
                        "store": {"type": "boolean"},
                        "user": _COMMON_PARAMETERS["user"],
                        "instructions": {"type": "string"},
                        "max_output_tokens": {"type": "integer", "minimum": 1},
                        "temperature": _NUMBER_PARAMETERS["temperature"],
                        "top_p": _NUMBER_PARAMETERS["top_p"],
                        "input": {
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "minItems": 1, "items": {"type": "object"}},
                            ]
                        },
                    },
                ),
            )
        },
        "/v1/responses/{response_id}": {
            "get": _stored_response_operation("A stored response: never found."),
            "delete": _stored_response_operation("Delete a stored response: never found."),
        },
        "/v1/responses/{response_id}/cancel": {
            "post": _stored_response_operation("Cancel a background response: never found."),
        },
        "/v1/embeddings": {
            "post": _completion_operation(
                "Embeddings of one or more inputs, from an embedding model.",
                object_of(
                    ["model", "input"],
                    {
                        "model": _COMMON_PARAMETERS["model"],
                        "user": _COMMON_PARAMETERS["user"],
                        "encoding_format": {"type": "string", "enum": ["float", "base64"]},
                        "dimensions": {"type": "integer", "minimum": 1},
                        "input": {
                            "oneOf": [
                                {"type": "string"},
                                {"type": "array", "minItems": 1, "items": {"type": "string"}},
                                {**_TOKEN_IDS, "minItems": 1},
                                {
                                    "type": "array",
                                    "minItems": 1,
                                    "items": {**_TOKEN_IDS, "minItems": 1},
                                },
                            ]
                        },
                    },
                ),
            )
        },
        **FILE_PATHS,
        **BATCH_PATHS,
    },
    "components": {
        "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "additionalProperties": False,
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["message", "type", "param", "code"],
                        "properties": {
                            "message": {"type": "string", "minLength": 1},
                            "type": {"type": "string"},
                            "param": {"type": "string", "nullable": True},
                            "code": {"type": "string", "nullable": True},
                        },
                    }
                },
            },
            "Model": object_of(
                ["id", "object", "created", "owned_by"],
                {
                    "id": {"type": "string"},
                    "object": {"type": "string", "enum": ["model"]},
                    "created": {"type": "integer"},
                    "owned_by": {"type": "string"},
                    "kind": {
                        "type": "string",
                        "enum": ["generate", "embedding"],
                        "description": "generate: chat, completions and responses; embedding: "
                        "embeddings.",
                    },
                    "warm": {"type": "boolean"},
                },
            ),
            "ModelList": object_of(
                ["object", "data"],
                {
                    "object": {"type": "string", "enum": ["list"]},
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                },
            ),
            **SCHEMAS,
        },
    },
}


async def openapi(request: HttpRequest) -> JsonResponse:
    """`GET /v1/openapi.json`: the description above (no key needed)."""
    return JsonResponse(DESCRIPTION)
