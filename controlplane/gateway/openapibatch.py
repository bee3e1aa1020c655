"""The OpenAPI description of OpenAI's Files and Batch APIs, as the gateway serves them.

Part of `/v1/openapi.json` (controlplane.gateway.openapi): the files are batch input and
output (controlplane.gateway.files), the batches run by controlplane.gateway.batchrun.
"""

from __future__ import annotations

from typing import Any

from controlplane.gateway.openapiparts import (
    error,
    list_of,
    object_of,
    ok,
    operation,
    path_id,
    query,
    refusals,
)

_AFTER = query("after", {"type": "string"}, "The id of the last object of the previous page.")
_NO_FILE = error("No file of this key has this id (`file_not_found`).")
_NO_BATCH = error("No batch of this key has this id (`batch_not_found`).")
_STORE_AWAY = error("The files store did not answer; retry later.")
_BATCH_ENDPOINTS = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]

# OpenAI's Files API, for batch input (controlplane.gateway.files).
FILE_PATHS: dict[str, Any] = {
    "/v1/files": {
        "get": operation(
            "The key's files, newest first (`order=asc`: oldest first).",
            {"200": ok("OpenAI's list of file objects.", "FileList"), **refusals(400, 401)},
            parameters=[
                query("purpose", {"type": "string"}, "Only files of this purpose."),
                query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 10000},
                    "At most this many (10,000 by default).",
                ),
                query("order", {"type": "string", "enum": ["asc", "desc"]}, "By creation."),
                _AFTER,
            ],
        ),
        "post": operation(
            "Upload a batch input file (JSON lines), checked line by line: a bad "
            "line is a 400 naming it, and nothing is stored.",
            {
                "200": ok("The file object.", "File"),
                **refusals(400, 401, 413),
                "503": _STORE_AWAY,
            },
            body=object_of(
                ["file", "purpose"],
                {
                    "file": {"type": "string", "format": "binary"},
                    "purpose": {"type": "string", "enum": ["batch"]},
                },
            ),
            body_type="multipart/form-data",
        ),
    },
    "/v1/files/{file_id}": {
        "get": operation(
            "One of the key's files.",
            {"200": ok("The file object.", "File"), **refusals(401), "404": _NO_FILE},
            parameters=[path_id("file_id")],
        ),
        "delete": operation(
            "Delete one of the key's files (not the input of an unfinished batch: "
            "400 `file_in_use`).",
            {
                "200": ok("`{id, object: file, deleted: true}`.", "Deleted"),
                **refusals(400, 401),
                "404": _NO_FILE,
                "503": _STORE_AWAY,
            },
            parameters=[path_id("file_id")],
        ),
    },
    "/v1/files/{file_id}/content": {
        "get": operation(
            "A file's bytes: a batch's input, output or error lines.",
            {
                "200": {
                    "description": "The file's bytes (JSON lines).",
                    "content": {"application/octet-stream": {"schema": {"type": "string"}}},
                },
                **refusals(401),
                "404": _NO_FILE,
                "503": _STORE_AWAY,
            },
            parameters=[path_id("file_id")],
        )
    },
}

# OpenAI's Batch API (controlplane.gateway.batchviews; run by gateway.batchrun).
BATCH_PATHS: dict[str, Any] = {
    "/v1/batches": {
        "get": operation(
            "The key's batches, newest first.",
            {"200": ok("OpenAI's list of batch objects.", "BatchList"), **refusals(400, 401)},
            parameters=[
                query(
                    "limit",
                    {"type": "integer", "minimum": 1, "maximum": 100},
                    "At most this many (20 by default).",
                ),
                _AFTER,
            ],
        ),
        "post": operation(
            "Create a batch from an uploaded input file; every line is checked "
            "again (its `url` must be the batch's `endpoint`, its model the key's).",
            {
                "200": ok("The batch object, `validating`.", "Batch"),
                **refusals(400, 401, 413),
                "404": _NO_FILE,
                "503": _STORE_AWAY,
            },
            body=object_of(
                ["input_file_id", "endpoint", "completion_window"],
                {
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
            ),
        ),
    },
    "/v1/batches/{batch_id}": {
        "get": operation(
            "One of the key's batches, its `request_counts` live.",
            {"200": ok("The batch object.", "Batch"), **refusals(401), "404": _NO_BATCH},
            parameters=[path_id("batch_id")],
        )
    },
    "/v1/batches/{batch_id}/cancel": {
        "post": operation(
            "Cancel a batch: no new line is sent, those in flight finish, and the "
            "files are written for what ran.",
            {
                "200": ok("The batch object, `cancelling`.", "Batch"),
                **refusals(401),
                "404": _NO_BATCH,
            },
            parameters=[path_id("batch_id")],
        )
    },
}

_TIMESTAMP = {"type": "integer", "nullable": True}
_BATCH_REQUIRED = [
    "id", "object", "endpoint", "input_file_id", "completion_window", "status", "created_at",
    "request_counts",
]  # fmt: skip
_BATCH_STATUSES = [
    "validating", "in_progress", "finalizing", "completed", "failed", "expired", "cancelling",
    "cancelled",
]  # fmt: skip
_BATCH_TIMES = [
    "created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at", "failed_at",
    "expired_at", "cancelling_at", "cancelled_at",
]  # fmt: skip
_COUNT = {"type": "integer"}
SCHEMAS: dict[str, Any] = {
    "File": object_of(
        ["id", "object", "bytes", "created_at", "filename", "purpose"],
        {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["file"]},
            "bytes": {"type": "integer"},
            "created_at": {"type": "integer"},
            "expires_at": _TIMESTAMP,
            "filename": {"type": "string"},
            "purpose": {"type": "string", "enum": ["batch", "batch_output"]},
            "status": {"type": "string"},
        },
    ),
    "FileList": list_of("File"),
    "Deleted": object_of(
        ["id", "object", "deleted"],
        {"id": {"type": "string"}, "object": {"type": "string"}, "deleted": {"type": "boolean"}},
    ),
    "Batch": object_of(
        _BATCH_REQUIRED,
        {
            "id": {"type": "string"},
            "object": {"type": "string", "enum": ["batch"]},
            "endpoint": {"type": "string", "enum": _BATCH_ENDPOINTS},
            "errors": {"type": "object", "nullable": True},
            "input_file_id": {"type": "string"},
            "completion_window": {"type": "string"},
            "status": {"type": "string", "enum": _BATCH_STATUSES},
            "output_file_id": {"type": "string", "nullable": True},
            "error_file_id": {"type": "string", "nullable": True},
            **{name: _TIMESTAMP for name in _BATCH_TIMES},
            "request_counts": object_of(
                ["total", "completed", "failed"],
                {"total": _COUNT, "completed": _COUNT, "failed": _COUNT},
            ),
            "metadata": {"type": "object", "nullable": True},
        },
    ),
    "BatchList": list_of("Batch"),
}
