"""`/v1/files`, as OpenAI's Files API: upload a batch's input, list, retrieve, download and
delete files. Each file belongs to the API key that uploaded it; another key's file is as
unknown as one that never existed (404)."""

from __future__ import annotations

import asyncio
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.files.uploadedfile import UploadedFile
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.utils.http import content_disposition_header
from django.views.decorators.csrf import csrf_exempt

from agents.models import Model
from controlplane.gateway import actions, batchactions, filestore
from controlplane.gateway.auth import AuthFailure, authenticate
from controlplane.gateway.batchinput import BadBatchInput, BatchInput, read_batch_input
from controlplane.gateway.errors import openai_error, openai_errors
from controlplane.gateway.models import ApiKey, FilePurpose, StoredFile
from controlplane.gateway.paging import could_be_id, page_of
from controlplane.gateway.state import current
from nodeagent.store.base import StoreError

_LIST_MOST = 10_000


@csrf_exempt
@openai_errors
async def files(request: HttpRequest) -> JsonResponse:
    """`POST /v1/files` (multipart: `file`, `purpose`) and `GET /v1/files`."""
    if request.method not in ("GET", "POST"):
        return openai_error(405, f"Method {request.method} is not allowed here.")
    key = await authenticate(request, current().cache)
    if isinstance(key, AuthFailure):
        return key.response
    if request.method == "GET":
        return await _listed(request, key)
    return await _uploaded(request, key)


@csrf_exempt
@openai_errors
async def file(request: HttpRequest, file_id: str) -> JsonResponse:
    """`GET` and `DELETE /v1/files/{file_id}`."""
    if request.method not in ("GET", "DELETE"):
        return openai_error(405, f"Method {request.method} is not allowed here.")
    found = await _owned(request, file_id)
    if not isinstance(found, StoredFile):
        return found
    if request.method == "GET":
        return JsonResponse(found.as_openai())
    reader = await sync_to_async(batchactions.in_use)(found)
    if reader is not None:
        return openai_error(400, f"The file {file_id} is the input of {reader.batch_id}, which "
                            "has not ended: cancel it, or delete the file once it ends.",
                            code="file_in_use", param="file_id")  # fmt: skip
    await sync_to_async(actions.delete_file)(found)
    return JsonResponse({"id": found.file_id, "object": "file", "deleted": True})


@csrf_exempt
@openai_errors
async def file_content(request: HttpRequest, file_id: str) -> HttpResponse:
    """`GET /v1/files/{file_id}/content`: the file's bytes."""
    if request.method != "GET":
        return openai_error(405, f"Method {request.method} is not allowed here; use GET.")
    found = await _owned(request, file_id)
    if not isinstance(found, StoredFile):
        return found
    try:
        data = await asyncio.to_thread(filestore.current().get, found.file_id)
    except StoreError as exc:
        return store_failed(exc, found.file_id)
    response = HttpResponse(data, content_type="application/octet-stream")
    response["Content-Disposition"] = content_disposition_header(True, found.filename)
    return response


def store_failed(exc: StoreError, file_id: str) -> JsonResponse:
    """A file whose bytes the store could not give: gone (404), or the store away (503)."""
    if exc.status == 404:
        return openai_error(404, f"The bytes of {file_id} are gone from the files store.",
                            code="file_not_found")  # fmt: skip
    return openai_error(503, f"The file's store did not answer ({exc.code}); retry later.",
                        code="file_store_unavailable")  # fmt: skip


async def _owned(request: HttpRequest, file_id: str) -> StoredFile | JsonResponse:
    key = await authenticate(request, current().cache)
    if isinstance(key, AuthFailure):
        return key.response
    found = (
        await StoredFile.objects.filter(api_key=key, file_id=file_id).afirst()
        if could_be_id(file_id)
        else None
    )
    if found is None:
        return openai_error(404, f"No such File object: {file_id}", code="file_not_found",
                            param="file_id")  # fmt: skip
    return found


async def _listed(request: HttpRequest, key: ApiKey) -> JsonResponse:
    """The key's files, with `purpose` to filter, as OpenAI pages them (`order` too)."""
    owned = StoredFile.objects.filter(api_key=key)
    rows = owned
    if purpose := request.GET.get("purpose"):
        rows = owned.filter(purpose=purpose) if could_be_id(purpose) else owned.none()
    return await page_of(request, owned, rows, id_field="file_id", name="File",
                         default_limit=_LIST_MOST, most=_LIST_MOST, orderable=True)  # fmt: skip


async def _uploaded(request: HttpRequest, key: ApiKey) -> JsonResponse:
    # Django parses the multipart body on first access: off the event loop, as large as it is.
    uploads, fields = await asyncio.to_thread(lambda: (request.FILES, request.POST))
    upload = uploads.get("file")
    purpose = fields.get("purpose")
    if upload is None:
        return openai_error(400, "Send the file as the multipart field `file`.", param="file",
                            code="missing_required_parameter")  # fmt: skip
    if purpose != FilePurpose.BATCH:
        return openai_error(
            400, "llmfleet keeps files for the Batch API: purpose must be `batch`.",
            param="purpose", code="invalid_value",
        )  # fmt: skip
    limit = settings.GATEWAY_FILES_MAX_BYTES
    if upload.size is not None and upload.size > limit:
        return openai_error(413, f"The file exceeds {limit} bytes.", code="file_too_large")
    data = await asyncio.to_thread(_read, upload)
    try:
        batch = await read_batch_input(data, settings.GATEWAY_MAX_TOKENS)
        await check_models(key, batch)
    except BadBatchInput as exc:
        return openai_error(400, str(exc), param="file", code="invalid_batch_input")
    try:
        stored = await sync_to_async(actions.create_file)(
            key, upload.name or "upload.jsonl", purpose, data, len(batch.lines)
        )
    except StoreError as exc:
        return openai_error(503, f"The file's store did not answer ({exc.code}); retry later.",
                            code="file_store_unavailable")  # fmt: skip
    return JsonResponse(stored.as_openai())


def _read(upload: UploadedFile[bytes]) -> bytes:
    data: bytes = upload.read()
    return data


async def check_models(key: ApiKey, batch: BatchInput) -> None:
    """Every model the lines name exists, is enabled, may be used by the key and serves the
    line's endpoint; BadBatchInput naming the first line that fails."""
    named = batch.models
    found: dict[str, Any] = {
        model.model_id: model
        async for model in Model.objects.filter(model_id__in=list(named), enabled=True)
    }
    for model_id, line in sorted(named.items(), key=lambda item: item[1].number):
        model = found.get(model_id)
        if model is None or not key.may_use(model):
            # A model the key may not use is as unknown to it as one that does not exist.
            raise BadBatchInput(f"The model `{model_id}` does not exist.", line.number)
        if model.kind != line.api.kind:
            raise BadBatchInput(
                f"The model `{model_id}` is of kind `{model.kind}`: it does not serve "
                f"{line.url}.", line.number,
            )  # fmt: skip
