"""`/v1/batches`, as OpenAI's Batch API: create a batch from an uploaded input file,
retrieve it, list the key's batches, cancel one. Each batch belongs to the key that created
it; another key's is as unknown as one that never existed (404)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import HttpRequest, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from controlplane.gateway import batchactions, filestore
from controlplane.gateway.auth import AuthFailure, authenticate
from controlplane.gateway.batchinput import BATCH_ENDPOINTS, BadBatchInput, read_batch_input
from controlplane.gateway.errors import openai_error, openai_errors
from controlplane.gateway.files import check_models, store_failed
from controlplane.gateway.models import ApiKey, Batch, FilePurpose, StoredFile
from controlplane.gateway.paging import could_be_id, page_of
from controlplane.gateway.state import current
from nodeagent.store.base import StoreError

_WINDOWS = ("24h",)
_LIST_MOST = 100
_METADATA_PAIRS, _METADATA_KEY, _METADATA_VALUE = 16, 64, 512


@csrf_exempt
@openai_errors
async def batches(request: HttpRequest) -> JsonResponse:
    """`POST /v1/batches` and `GET /v1/batches`."""
    if request.method not in ("GET", "POST"):
        return openai_error(405, f"Method {request.method} is not allowed here.")
    key = await authenticate(request, current().cache)
    if isinstance(key, AuthFailure):
        return key.response
    if request.method == "GET":
        return await _listed(request, key)
    return await _created(request, key)


@csrf_exempt
@openai_errors
async def batch(request: HttpRequest, batch_id: str) -> JsonResponse:
    """`GET /v1/batches/{batch_id}`."""
    if request.method != "GET":
        return openai_error(405, f"Method {request.method} is not allowed here; use GET.")
    found = await _owned(request, batch_id)
    return found if isinstance(found, JsonResponse) else JsonResponse(found.as_openai())


@csrf_exempt
@openai_errors
async def cancel(request: HttpRequest, batch_id: str) -> JsonResponse:
    """`POST /v1/batches/{batch_id}/cancel`: lines in flight finish, no new one is sent, the
    files are written for what ran."""
    if request.method != "POST":
        return openai_error(405, f"Method {request.method} is not allowed here; use POST.")
    found = await _owned(request, batch_id)
    if isinstance(found, JsonResponse):
        return found
    cancelled = await sync_to_async(batchactions.cancel)(found)
    return JsonResponse(cancelled.as_openai())


async def _owned(request: HttpRequest, batch_id: str) -> Batch | JsonResponse:
    key = await authenticate(request, current().cache)
    if isinstance(key, AuthFailure):
        return key.response
    rows = Batch.objects.select_related("output_file", "error_file")
    found = (
        await rows.filter(api_key=key, batch_id=batch_id).afirst()
        if could_be_id(batch_id)
        else None
    )
    if found is None:
        return openai_error(404, f"No such Batch object: {batch_id}", code="batch_not_found",
                            param="batch_id")  # fmt: skip
    return found


async def _listed(request: HttpRequest, key: ApiKey) -> JsonResponse:
    """The key's batches, newest first, `limit` (1 to 100, default 20) after the id `after`."""
    owned = Batch.objects.filter(api_key=key)
    rows = owned.select_related("output_file", "error_file")
    return await page_of(request, owned, rows, id_field="batch_id", name="Batch",
                         default_limit=20, most=_LIST_MOST)  # fmt: skip


def _refused(message: str, param: str | None = None, code: str = "invalid_value") -> JsonResponse:
    return openai_error(400, message, param=param, code=code)


async def _created(request: HttpRequest, key: ApiKey) -> JsonResponse:
    try:
        body = json.loads(request.body)
    except (ValueError, UnicodeDecodeError) as exc:
        return _refused(f"We could not parse the JSON body of your request: {exc}",
                        code="invalid_json")  # fmt: skip
    if not isinstance(body, dict):
        return _refused("The request body must be a JSON object.", code="invalid_json")
    asked = _checked_fields(body)
    if isinstance(asked, JsonResponse):
        return asked
    file_id, endpoint, metadata = asked
    stored = (
        await StoredFile.objects.filter(api_key=key, file_id=file_id).afirst()
        if could_be_id(file_id)
        else None
    )
    if stored is None:
        return openai_error(404, f"No such File object: {file_id}", param="input_file_id",
                            code="file_not_found")  # fmt: skip
    if stored.purpose != FilePurpose.BATCH:
        return _refused(f"The file {file_id} is not a batch input file (its purpose is "
                        f"{stored.purpose}).", "input_file_id")  # fmt: skip
    try:
        data = await asyncio.to_thread(filestore.current().get, stored.file_id)
    except StoreError as exc:
        return store_failed(exc, stored.file_id)
    try:
        lines = await read_batch_input(data, settings.GATEWAY_MAX_TOKENS)
        wrong = next((line for line in lines.lines if line.url != endpoint), None)
        if wrong is not None:
            raise BadBatchInput(f"url {wrong.url} is not the batch's endpoint {endpoint}.",
                                wrong.number)  # fmt: skip
        await check_models(key, lines)
    except BadBatchInput as exc:
        return _refused(str(exc), "input_file_id", "invalid_batch_input")
    made = await sync_to_async(batchactions.create_batch)(key, stored, endpoint, metadata)
    return JsonResponse(made.as_openai())


def _checked_fields(body: dict[str, Any]) -> tuple[str, str, dict[str, str] | None] | JsonResponse:
    file_id = body.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        return _refused("input_file_id is required: the id of an uploaded batch input file.",
                        "input_file_id", "missing_required_parameter")  # fmt: skip
    endpoint = body.get("endpoint")
    if endpoint not in BATCH_ENDPOINTS:
        return _refused(f"endpoint must be one of {', '.join(BATCH_ENDPOINTS)}.", "endpoint")
    if body.get("completion_window") not in _WINDOWS:
        return _refused("completion_window must be 24h.", "completion_window")
    metadata = body.get("metadata")
    if metadata is not None and not _metadata_ok(metadata):
        return _refused(
            f"metadata is at most {_METADATA_PAIRS} pairs of strings, keys of at most "
            f"{_METADATA_KEY} characters and values of at most {_METADATA_VALUE}, without "
            "NUL characters.", "metadata",
        )  # fmt: skip
    return file_id, endpoint, metadata


def _metadata_ok(metadata: Any) -> bool:
    return (
        isinstance(metadata, dict)
        and len(metadata) <= _METADATA_PAIRS
        and all(
            isinstance(name, str) and isinstance(value, str)
            and len(name) <= _METADATA_KEY and len(value) <= _METADATA_VALUE
            and "\x00" not in name + value  # PostgreSQL's JSON keeps no NUL
            for name, value in metadata.items()
        )
    )  # fmt: skip
