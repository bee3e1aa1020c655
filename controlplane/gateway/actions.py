"""Every write the gateway makes: API keys (the admin and the management command call
these), usage, and what a request's `keep_alive` asks of the replica that served it."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta
from pathlib import Path

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError, IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from agents.models import Model, Placement
from controlplane.gateway import filestore
from controlplane.gateway.models import (
    ApiKey,
    PriorityClasses,
    RequestMinute,
    StoredFile,
    Usage,
)
from nodeagent.store.base import StoreError

log = logging.getLogger(__name__)


class UnknownModels(ValueError):
    """Some model ids named for a key's allow-list are not in the catalog."""

    def __init__(self, model_ids: list[str]) -> None:
        super().__init__(f"not in the catalog: {', '.join(model_ids)}")
        self.model_ids = model_ids


def create_api_key(
    name: str,
    model_ids: Iterable[str] = (),
    *,
    requests_per_minute: int | None = None,
    tokens_per_minute: int | None = None,
    expires_at: datetime | None = None,
    all_models: bool | None = None,
    weight: int = 1,
    priority_classes: str = PriorityClasses.ANY,
) -> tuple[ApiKey, str]:
    """Create a key and return it with its secret, which is stored only as a hash.

    `all_models` None: every model when `model_ids` is empty, else only those. Either way
    the key stores the choice, so the list never widens later.

    Raises `UnknownModels` (and creates nothing) when an allowed model is not in the catalog.
    """
    wanted = sorted(set(model_ids))
    found = {model.model_id: model for model in Model.objects.filter(model_id__in=wanted)}
    missing = [model_id for model_id in wanted if model_id not in found]
    if missing:
        raise UnknownModels(missing)
    key = ApiKey(
        name=name,
        requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute,
        expires_at=expires_at,
        all_models=not wanted if all_models is None else all_models,
        weight=weight,
        priority_classes=priority_classes,
    )
    raw_key = key.set_new_secret()
    with transaction.atomic():
        key.save()
        key.allowed_models.set(found.values())
    return key, raw_key


def revoke_api_keys(key_ids: Iterable[int]) -> int:
    """Revoke keys at once (their next request gets 401); returns how many were newly revoked."""
    return ApiKey.objects.filter(pk__in=list(key_ids), revoked_at=None).update(
        revoked_at=timezone.now()
    )


async def record_usage(
    key_id: int, model_id: str, prompt_tokens: int, completion_tokens: int, requests: int = 1
) -> None:
    """Add requests and their tokens to the key's usage for the model today; mark the key used.
    One transaction: a batch whose write fails is written again whole (gateway.batches), so a
    failure after the usage row was written must take that row's addition back with it."""
    await sync_to_async(_record_usage)(key_id, model_id, prompt_tokens, completion_tokens, requests)


def _record_usage(
    key_id: int, model_id: str, prompt_tokens: int, completion_tokens: int, requests: int
) -> None:
    now = timezone.now()
    counts = {
        "requests": F("requests") + requests,
        "prompt_tokens": F("prompt_tokens") + prompt_tokens,
        "completion_tokens": F("completion_tokens") + completion_tokens,
    }
    with transaction.atomic():
        rows = Usage.objects.filter(api_key_id=key_id, model_id=model_id, day=now.date())
        if not rows.update(**counts):
            try:
                with transaction.atomic():  # a savepoint: the race below leaves the rest usable
                    Usage.objects.create(
                        api_key_id=key_id, model_id=model_id, day=now.date(), requests=requests,
                        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                    )  # fmt: skip
            except IntegrityError:  # another process created today's row first
                rows.update(**counts)
        ApiKey.objects.filter(pk=key_id).update(last_used_at=now)


def granted_keep_alive(asked_seconds: float, model: Model) -> timedelta:
    """What a request's `keep_alive` gets: what it asked, at most the model's maximum."""
    if asked_seconds >= model.max_keep_alive.total_seconds():
        return model.max_keep_alive
    return timedelta(seconds=asked_seconds)


async def keep_replica_alive(placement_pk: int, asked_seconds: float, model: Model) -> None:
    """The replica that served a request with `keep_alive` stays on the GPU that long once
    idle (the sweep reads it), until a later request asks otherwise.

    `update`, not `save`: the row's `updated_at` names the replica's generation to the
    router, and a keep-alive is no new generation. Off the request's path: a database that
    is away costs the keep-alive, never the answer.
    """
    try:
        await Placement.objects.filter(pk=placement_pk).aupdate(
            keep_alive=granted_keep_alive(asked_seconds, model)
        )
    except DatabaseError:
        log.exception("could not record keep_alive for placement %s", placement_pk)


def prune_history(now: datetime | None = None) -> dict[str, int]:
    """Delete per-minute request figures older than RETENTION_REQUEST_MINUTES_DAYS and daily
    usage older than RETENTION_USAGE_DAYS; how many of each."""
    from agents.actions.history import delete_in_batches

    now = now or timezone.now()
    minutes = now - timedelta(days=settings.RETENTION_REQUEST_MINUTES_DAYS)
    day = (now - timedelta(days=settings.RETENTION_USAGE_DAYS)).date()
    return {
        "request_minutes": delete_in_batches(RequestMinute.objects.filter(minute__lt=minutes)),
        "usage": delete_in_batches(Usage.objects.filter(day__lt=day)),
    }


def create_file(key: ApiKey, filename: str, purpose: str, data: bytes, lines: int) -> StoredFile:
    """Store a file's bytes, then its row: a row always has its bytes. Bytes whose row could
    not be written are removed again. Raises StoreError when the store does not take them."""
    store = filestore.current()
    stored = StoredFile(api_key=key, filename=filename[:255], purpose=purpose,
                        bytes=len(data), lines=lines, location=store.location)  # fmt: skip
    store.put(stored.file_id, data)
    return _saved(stored)


def create_file_from(
    key: ApiKey, filename: str, purpose: str, path: Path, lines: int
) -> StoredFile:
    """create_file, for bytes in a local file (streamed to the store)."""
    store = filestore.current()
    size = path.stat().st_size
    stored = StoredFile(api_key=key, filename=filename[:255], purpose=purpose, bytes=size,
                        lines=lines, location=store.location)  # fmt: skip
    store.put_path(stored.file_id, path)
    return _saved(stored)


def _saved(stored: StoredFile) -> StoredFile:
    store = filestore.current()
    try:
        stored.save()
    except BaseException:
        store.remove(stored.file_id)
        raise
    return stored


def delete_file(stored: StoredFile) -> None:
    """The row first, then the bytes: a file is never listed without them. Bytes whose
    removal fails are left behind (logged), never a row."""
    stored.delete()
    try:
        filestore.current().remove(stored.file_id)
    except StoreError:
        log.exception("could not remove the bytes of deleted file %s", stored.file_id)
