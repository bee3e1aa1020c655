"""The OpenAPI description of `/v1`, served at `GET /v1/openapi.json`.

It describes what the gateway itself checks and answers: the parameters it
validates (`validation.py`), the error shape every refusal has, and the status
codes it uses. Parameters it does not interpret pass to the engine untouched, so
request bodies allow additional properties. `tests/gateway/test_fuzz.py` runs
schemathesis against it.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, JsonResponse

_ERROR = {"$ref": "#/components/schemas/Error"}


def _refusals(*statuses: int) -> dict[str, Any]:
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
            "content": {"application/json": {"schema": _ERROR}},
        }
        for status in statuses
    }


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
    return {
        "summary": summary,
        "security": [{"apiKey": []}],
        "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
        "responses": {"200": _ANSWER, **_refusals(400, 401, 403, 404, 413, 429, 503)},
    }


def _stored_response_operation(summary: str) -> dict[str, Any]:
    """llmfleet stores no response (any replica may answer, and an engine's memory goes when
    it is stepped down), so these answer 404 `response_not_found` for every id."""
    return {
        "summary": summary + " llmfleet stores no responses; the 404's message says why.",
        "security": [{"apiKey": []}],
        "parameters": [
            {
                "name": "response_id",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "minLength": 1},
            }
        ],
        "responses": {
            **_refusals(401),
            "404": {
                "description": "No response is stored under this id (none ever is).",
                "content": {"application/json": {"schema": _ERROR}},
            },
        },
    }


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
    }


def _path_id(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


_AFTER = _query("after", {"type": "string"}, "The id of the last object of the previous page.")
_NO_FILE = _error("No file of this key has this id (`file_not_found`).")
_NO_BATCH = _error("No batch of this key has this id (`batch_not_found`).")
_BATCH_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]

# OpenAI's Files API, for batch input (controlplane.gateway.files).
_FILE_PATHS: dict[str, Any] = {
    "/v1/files": {
        "get": {
            "summary": "The key's files, newest first (`order=asc`: oldest first).",
            "security": [{"apiKey": []}],
            "parameters": [
                _query("purpose", {"type": "string"}, "Only files of this purpose."),
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 10000},
                    "At most this many (10,000 by default).",
                ),
                _query("order", {"type": "string", "enum": ["asc", "desc"]}, "By creation."),
                _AFTER,
            ],
            "responses": {
                "200": _ok("OpenAI's list of file objects.", "FileList"),
                **_refusals(400, 401),
            },
        },
        "post": {
            "summary": "Upload a batch input file (JSON lines), checked line by line: a bad "
            "line is a 400 naming it, and nothing is stored.",
            "security": [{"apiKey": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "multipart/form-data": {
                        "schema": {
                            "type": "object",
                            "required": ["file", "purpose"],
                            "properties": {
                                "file": {"type": "string", "format": "binary"},
                                "purpose": {"type": "string", "enum": ["batch"]},
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _ok("The file object.", "File"),
                **_refusals(400, 401, 413),
                "503": _error("The files store did not answer; retry later."),
            },
        },
    },
    "/v1/files/{file_id}": {
        "get": {
            "summary": "One of the key's files.",
            "security": [{"apiKey": []}],
            "parameters": [_path_id("file_id")],
            "responses": {
                "200": _ok("The file object.", "File"),
                **_refusals(401),
                "404": _NO_FILE,
            },
        },
        "delete": {
            "summary": "Delete one of the key's files (not the input of an unfinished batch: "
            "400 `file_in_use`).",
            "security": [{"apiKey": []}],
            "parameters": [_path_id("file_id")],
            "responses": {
                "200": _ok("`{id, object: file, deleted: true}`.", "Deleted"),
                **_refusals(400, 401),
                "404": _NO_FILE,
                "503": _error("The files store did not answer; retry later."),
            },
        },
    },
    "/v1/files/{file_id}/content": {
        "get": {
            "summary": "A file's bytes: a batch's input, output or error lines.",
            "security": [{"apiKey": []}],
            "parameters": [_path_id("file_id")],
            "responses": {
                "200": {
                    "description": "The file's bytes (JSON lines).",
                    "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                },
                **_refusals(401),
                "404": _NO_FILE,
                "503": _error("The files store did not answer; retry later."),
            },
        }
    },
}

# OpenAI's Batch API (controlplane.gateway.batchviews; run by gateway.batchrun).
_BATCH_PATHS: dict[str, Any] = {
    "/v1/batches": {
        "get": {
            "summary": "The key's batches, newest first.",
            "security": [{"apiKey": []}],
            "parameters": [
                _query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 100},
                    "At most this many (20 by default).",
                ),
                _AFTER,
            ],
            "responses": {
                "200": _ok("OpenAI's list of batch objects.", "BatchList"),
                **_refusals(400, 401),
            },
        },
        "post": {
            "summary": "Create a batch from an uploaded input file; every line is checked "
            "again (its `url` must be the batch's `endpoint`, its model the key's).",
            "security": [{"apiKey": []}],
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "required": ["input_file_id", "endpoint", "completion_window"],
                            "properties": {
                                "input_file_id": {"type": "string", "minLength": 1},
                                "endpoint": {"type": "string", "enum": _BATCH_ENDPOINTS},
                                "completion_window": {"type": "string", "enum": ["24h"]},
                                "metadata": {
                                    "type": "object",
                                    "nullable": True,
                                    "maxProperties": 16,
                                    "additionalProperties": {"type": "string", "maxLength": 512},
                                },
                            },
                        }
                    }
                },
            },
            "responses": {
                "200": _ok("The batch object, `validating`.", "Batch"),
                **_refusals(400, 401, 413),
                "404": _NO_FILE,
                "503": _error("The files store did not answer; retry later."),
            },
        },
    },
    "/v1/batches/{batch_id}": {
        "get": {
            "summary": "One of the key's batches, its `request_counts` live.",
            "security": [{"apiKey": []}],
            "parameters": [_path_id("batch_id")],
            "responses": {
                "200": _ok("The batch object.", "Batch"),
                **_refusals(401),
                "404": _NO_BATCH,
            },
        }
    },
    "/v1/batches/{batch_id}/cancel": {
        "post": {
            "summary": "Cancel a batch: no new line is sent, those in flight finish, and the "
            "files are written for what ran.",
            "security": [{"apiKey": []}],
            "parameters": [_path_id("batch_id")],
            "responses": {
                "200": _ok("The batch object, `cancelling`.", "Batch"),
                **_refusals(401),
                "404": _NO_BATCH,
            },
        }
    },
}

_TIMESTAMP = {"type": "integer", "nullable": True}
_FILE_SCHEMAS: dict[str, Any] = {
    "File": {
        "type": "object",
        "required": ["id", "object", "bytes", "created_at", "filename", "purpose"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["file"]},
            "bytes": {"type": "integer"},
            "created_at": {"type": "integer"},
            "expires_at": _TIMESTAMP,
            "filename": {"type": "string"},
            "purpose": {"type": "string", "enum": ["batch", "batch_output"]},
            "status": {"type": "string"},
        },
    },
    "FileList": {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/File"}},
            "has_more": {"type": "boolean"},
            "first_id": {"type": "string", "nullable": True},
            "last_id": {"type": "string", "nullable": True},
        },
    },
    "Deleted": {
        "type": "object",
        "required": ["id", "object", "deleted"],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string"},
            "deleted": {"type": "boolean"},
        },
    },
    "Batch": {
        "type": "object",
        "required": [
            "id",
            "object",
            "endpoint",
            "input_file_id",
            "completion_window",
            "status",
            "created_at",
            "request_counts",
        ],
        "properties": {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["batch"]},
            "endpoint": {"type": "string", "enum": _BATCH_ENDPOINTS},
            "errors": {"type": "object", "nullable": True},
            "input_file_id": {"type": "string"},
            "completion_window": {"type": "string"},
            "status": {
                "type": "string",
                "enum": [
                    "validating",
                    "in_progress",
                    "finalizing",
                    "completed",
                    "failed",
                    "expired",
                    "cancelling",
                    "cancelled",
                ],
            },
            "output_file_id": {"type": "string", "nullable": True},
            "error_file_id": {"type": "string", "nullable": True},
            **{
                name: _TIMESTAMP
                for name in (
                    "created_at",
                    "in_progress_at",
                    "expires_at",
                    "finalizing_at",
                    "completed_at",
                    "failed_at",
                    "expired_at",
                    "cancelling_at",
                    "cancelled_at",
                )
            },
            "request_counts": {
                "type": "object",
                "required": ["total", "completed", "failed"],
                "properties": {
                    "total": {"type": "integer"},
                    "completed": {"type": "integer"},
                    "failed": {"type": "integer"},
                },
            },
            "metadata": {"type": "object", "nullable": True},
        },
    },
    "BatchList": {
        "type": "object",
        "required": ["object", "data", "has_more"],
        "properties": {
            "object": {"type": "string", "enum": ["list"]},
            "data": {"type": "array", "items": {"$ref": "#/components/schemas/Batch"}},
            "has_more": {"type": "boolean"},
            "first_id": {"type": "string", "nullable": True},
            "last_id": {"type": "string", "nullable": True},
        },
    },
}


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
            "get": {
                "summary": "The models this key may use, and whether each is warm.",
                "security": [{"apiKey": []}],
                "responses": {
                    "200": {
                        "description": "OpenAI's list shape.",
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/ModelList"}
                            }
                        },
                    },
                    **_refusals(401, 503),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "One model this key may use, as listed.",
                "security": [{"apiKey": []}],
                "parameters": [
                    {
                        "name": "model",
                        "in": "path",
                        "required": True,
                        "description": "The model's id; it may contain `/`.",
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {
                    "200": {
                        "description": "OpenAI's model shape.",
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/Model"}}
                        },
                    },
                    **_refusals(401, 404, 503),
                },
            }
        },
        "/v1/chat/completions": {
            "post": _completion_operation(
                "A chat completion, streamed or not.",
                {
                    "type": "object",
                    "required": ["model", "messages"],
                    "properties": {
                        **_COMMON_PARAMETERS,
                        "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
                    },
                },
            )
        },
        "/v1/completions": {
            "post": _completion_operation(
                "A text completion, streamed or not.",
                {
                    "type": "object",
                    "required": ["model", "prompt"],
                    "properties": {
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
                },
            )
        },
        "/v1/responses": {
            "post": _completion_operation(
                "A response (OpenAI's Responses API), streamed as typed events or not. "
                "`previous_response_id` and `background` are refused: llmfleet stores no "
                "responses.",
                {
                    "type": "object",
                    "required": ["model", "input"],
                    "properties": {
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
                },
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
                {
                    "type": "object",
                    "required": ["model", "input"],
                    "properties": {
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
                },
            )
        },
        **_FILE_PATHS,
        **_BATCH_PATHS,
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
            "Model": {
                "type": "object",
                "required": ["id", "object", "created", "owned_by"],
                "properties": {
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
            },
            "ModelList": {
                "type": "object",
                "required": ["object", "data"],
                "properties": {
                    "object": {"type": "string", "enum": ["list"]},
                    "data": {"type": "array", "items": {"$ref": "#/components/schemas/Model"}},
                },
            },
            **_FILE_SCHEMAS,
        },
    },
}


async def openapi(request: HttpRequest) -> JsonResponse:
    """`GET /v1/openapi.json`: the description above (no key needed)."""
    return JsonResponse(DESCRIPTION)
