"""Short-lived, per-process memory of keys, models and replicas, off the request's path.

Every `/v1` request needs its key and its model; reading both from the
database each time costs more than the rest of the gateway together (see
bench/README.md). Entries live `GATEWAY_CACHE_SECONDS` (0 turns this off):
a revoked key or a disabled model takes at most that long to stop working.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from django.conf import settings
from django.db import DatabaseError

from agents.models import Model, Placement
from controlplane.gateway.handler import drop_broken_connections
from controlplane.gateway.models import ApiKey, hash_key

T = TypeVar("T")
_entries: dict[tuple[str, str], tuple[float, object]] = {}
_MAX_ENTRIES = 10_000


async def _remember(
    kind: str,
    name: str,
    load: Callable[[], Awaitable[T]],
    most: float | None = None,
    *,
    refresh_behind: bool = False,
) -> T:
    """The cached value, loaded when missing or older than the TTL.

    With `refresh_behind`, a value past its TTL (but younger than five TTLs) is still
    returned while one background task loads the new one: the request that finds it
    stale does not wait for the query (what kept the p99 up, bench/README.md).
    """
    ttl = (
        settings.GATEWAY_CACHE_SECONDS
        if most is None
        else min(settings.GATEWAY_CACHE_SECONDS, most)
    )
    now = time.monotonic()
    entry = _entries.get((kind, name))
    if ttl and entry is not None:
        age = now - entry[0]
        if age < ttl:
            return entry[1]  # type: ignore[return-value]
        if refresh_behind and age < 5 * ttl:
            if (kind, name) not in _refreshing:
                task = asyncio.get_running_loop().create_task(_load(kind, name, load, ttl))
                _refreshing[kind, name] = task
                task.add_done_callback(lambda _: _refreshing.pop((kind, name), None))
            return entry[1]  # type: ignore[return-value]
    return await _load(kind, name, load, ttl)


_refreshing: dict[tuple[str, str], asyncio.Task[object]] = {}


async def _load(kind: str, name: str, load: Callable[[], Awaitable[T]], ttl: float) -> T:
    started = time.monotonic()
    try:
        value = await load()
    except DatabaseError:
        # The /v1 handler ends no request with close_old_connections (handler.py).
        await drop_broken_connections()
        raise
    if ttl:
        if len(_entries) >= _MAX_ENTRIES:  # many one-off wrong keys: start afresh, never grow
            _entries.clear()
        _entries[kind, name] = (started, value)
    return value


async def key_for_secret(raw_key: str) -> ApiKey | None:
    """The key with this secret, with its allow-list's model ids prefetched."""
    digest = hash_key(raw_key)

    async def load() -> ApiKey | None:
        key = await ApiKey.objects.for_secret(raw_key).afirst()
        if key is not None:
            key.allowed_ids = {pk async for pk in key.allowed_models.values_list("pk", flat=True)}
        return key

    return await _remember("key", digest, load)


async def enabled_model(model_id: str) -> Model | None:
    return await _remember(
        "model",
        model_id,
        lambda: (
            Model.objects.select_related("base").filter(model_id=model_id, enabled=True).afirst()
        ),
    )


async def ready_placements(model: Model) -> list[Placement]:
    """The model's routable READY placements, at most a second old: a drain or a new replica
    reaches routing within a second, well inside the heartbeat interval."""

    async def load() -> list[Placement]:
        return [placement async for placement in Placement.objects.ready_for(model)]

    return await _remember("placements", model.model_id, load, most=1.0, refresh_behind=True)


def forget_placements(model: Model) -> None:
    """A load just finished here: the next request must not see the empty list from before."""
    _entries.pop(("placements", model.model_id), None)


def clear() -> None:
    _entries.clear()
