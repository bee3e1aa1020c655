"""Short-lived, per-process memory of keys, models and replicas, off the request's path.

Every `/v1` request needs its key and its model; reading both from the
database each time costs more than the rest of the gateway together (see
bench/README.md). Entries live `GATEWAY_CACHE_SECONDS` (0 turns this off):
a revoked key or a disabled model takes at most that long to stop working, plus
the one lookup that finds it so.

No request waits for a lookup that a value in memory can answer: an entry past
its TTL is still served while one background lookup replaces it (keys and
models up to twice the TTL, replicas up to five), and the requests that find an
entry missing share one lookup. The web process reads the database through one
ORM thread, which its batched writes also use; a request that queued its own
lookup behind a write waiting for the database's lock waited with it (seconds on
the embedded SQLite while the worker writes heartbeats: bench/README.md,
realclient).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import timedelta
from functools import partial
from typing import TypeVar

from django.conf import settings
from django.db import DatabaseError
from django.db.models import Q
from django.utils import timezone

from agents.models import Model, Placement
from controlplane.gateway.handler import drop_broken_connections
from controlplane.gateway.models import KEY_PREFIX, ApiKey, hash_key

T = TypeVar("T")
_MAX_ENTRIES = 10_000
# What entries' ages are read from (a test sets its own; the event loop keeps its own).
clock = time.monotonic


class Memory:
    """What the process remembers of the database's rows: plain values, valid on every event
    loop, so the process keeps one (MEMORY) for all of its loops' caches.

    Least recently used first: past _MAX_ENTRIES that one goes (one-off lookups, mostly: a key
    deleted, a model name nobody serves), so no run of misses ever empties it of the keys and
    models every request needs."""

    def __init__(self) -> None:
        self.entries: OrderedDict[tuple[str, str], tuple[float, object]] = OrderedDict()

    def clear(self) -> None:
        self.entries.clear()


MEMORY = Memory()

# What the gateway issues (controlplane.gateway.models.new_raw_key): anything else is no key,
# and is refused without a lookup.
_KEY_SHAPE = re.compile(rf"{re.escape(KEY_PREFIX)}[A-Za-z0-9_-]{{43}}")
# Misses of the known-keys set ask the database at most this often, all waiting together.
_KNOWN_REFRESH_SECONDS = 0.1
# How often the set is read whole (deleted keys leave it then; new ones join at once).
_KNOWN_RELOAD_SECONDS = 300.0
# How far back a look at the new keys reaches, for keys whose commit came late.
_KNOWN_LOOK_BACK_SECONDS = 60.0


class KnownKeys:
    """Which keys exist, per process: the first 64 bits of every key's hash. A presented key
    whose hash is not there is refused without a query, so a flood of made-up keys costs the
    database (and the gateway's one ORM thread) at most one small query per
    `_KNOWN_REFRESH_SECONDS`: the keys created since the last look (ids above the highest
    seen). A key created a moment ago is found by that look, which its request waits for."""

    def __init__(self) -> None:
        self.prefixes: set[int] = set()
        self.highest_id = 0
        self.loaded_at = -_KNOWN_RELOAD_SECONDS
        self.looked_at = 0.0
        self.looking: asyncio.Task[None] | None = None

    async def holds(self, digest: str) -> bool:
        prefix = int(digest[:16], 16)
        if prefix in self.prefixes:
            return True
        if self.looking is None or self.looking.done():
            self.looking = asyncio.get_running_loop().create_task(self._look())
        await asyncio.shield(self.looking)
        return prefix in self.prefixes

    async def _look(self) -> None:
        await asyncio.sleep(max(self.looked_at + _KNOWN_REFRESH_SECONDS - time.monotonic(), 0))
        whole = time.monotonic() - self.loaded_at >= _KNOWN_RELOAD_SECONDS
        keys = ApiKey.objects.values_list("pk", "key_hash").order_by()
        if not whole:
            # Ids are drawn at insert, commits land in any order: a key whose transaction ran
            # long (the admin's) may commit below the highest id seen. The last minute's keys
            # are asked for again (a handful); older stragglers wait for the whole read.
            recent = timezone.now() - timedelta(seconds=_KNOWN_LOOK_BACK_SECONDS)
            keys = keys.filter(Q(pk__gt=self.highest_id) | Q(created_at__gte=recent))
        try:
            rows = [row async for row in keys]
        except DatabaseError:
            await drop_broken_connections()
            raise
        finally:
            self.looked_at = time.monotonic()
        found = {int(key_hash[:16], 16) for _, key_hash in rows}
        if whole:
            self.prefixes, self.loaded_at = found, time.monotonic()
        else:
            self.prefixes |= found
        self.highest_id = max((pk for pk, _ in rows), default=self.highest_id)


def looks_like_a_key(raw_key: str) -> bool:
    return bool(_KEY_SHAPE.fullmatch(raw_key))


class Cache:
    """One event loop's cache (controlplane.gateway.state): lookups that answer from MEMORY
    while it is fresh, with the loop's own background refreshes and known-keys set."""

    def __init__(self, memory: Memory = MEMORY) -> None:
        self.memory = memory
        self.refreshing: dict[tuple[str, str], asyncio.Task[object]] = {}
        self.known = KnownKeys()

    def forget(self) -> None:
        self.memory.clear()
        self.known = KnownKeys()

    async def _remember(
        self,
        kind: str,
        name: str,
        load: Callable[[], Awaitable[T]],
        most: float | None = None,
        *,
        stale_for: float = 2.0,
    ) -> T:
        """The cached value, loaded when missing or older than `stale_for` TTLs; between one
        TTL and that, the value in memory while one background task loads the new one."""
        ttl = (
            settings.GATEWAY_CACHE_SECONDS
            if most is None
            else min(settings.GATEWAY_CACHE_SECONDS, most)
        )
        now = clock()
        entries = self.memory.entries
        entry = entries.get((kind, name))
        if ttl and entry is not None:
            age = now - entry[0]
            entries.move_to_end((kind, name))  # used: the last to go
            if age < ttl:
                return entry[1]  # type: ignore[return-value]
            if age < stale_for * ttl:
                self._lookup(kind, name, load, ttl)
                return entry[1]  # type: ignore[return-value]
        if not ttl:
            return await self._load(kind, name, load, ttl)
        # Missing, or too old to serve: one lookup, shared by every request that finds it so
        # (shielded: a client that leaves does not cancel the others' lookup).
        found: object = await asyncio.shield(self._lookup(kind, name, load, ttl))
        return found  # type: ignore[return-value]

    def _lookup(
        self, kind: str, name: str, load: Callable[[], Awaitable[T]], ttl: float
    ) -> asyncio.Task[object]:
        """The lookup of this entry under way, started if none is."""
        task = self.refreshing.get((kind, name))
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(kind, name, load, ttl))
            self.refreshing[kind, name] = task
            task.add_done_callback(partial(self._looked_up, kind, name))
        return task

    def _looked_up(self, kind: str, name: str, task: asyncio.Task[object]) -> None:
        self.refreshing.pop((kind, name), None)
        if not task.cancelled():
            task.exception()  # seen: a failed refresh behind requests is the next lookup's

    async def _load(self, kind: str, name: str, load: Callable[[], Awaitable[T]], ttl: float) -> T:
        started = clock()
        try:
            value = await load()
        except DatabaseError:
            # The /v1 handler ends no request with close_old_connections (handler.py).
            await drop_broken_connections()
            raise
        if ttl:
            entries = self.memory.entries
            entries.pop((kind, name), None)  # to the end: the newest
            while len(entries) >= _MAX_ENTRIES:
                entries.popitem(last=False)
            entries[kind, name] = (started, value)
        return value

    async def key_for_secret(self, raw_key: str) -> ApiKey | None:
        """The key with this secret, with its allow-list's model ids prefetched. What is not
        shaped like a key, or not among the keys that exist (KnownKeys), is None without a
        lookup."""
        if not looks_like_a_key(raw_key):
            return None
        digest = hash_key(raw_key)
        if settings.GATEWAY_CACHE_SECONDS and not await self.known.holds(digest):
            return None

        async def load() -> ApiKey | None:
            key = await ApiKey.objects.for_secret(raw_key).afirst()
            if key is not None:
                key.allowed_ids = {
                    pk async for pk in key.allowed_models.values_list("pk", flat=True)
                }
            return key

        return await self._remember("key", digest, load)

    async def enabled_model(self, model_id: str) -> Model | None:
        return await self._remember(
            "model",
            model_id,
            lambda: (
                Model.objects.select_related("base")
                .filter(model_id=model_id, enabled=True)
                .afirst()
            ),
        )

    async def ready_placements(self, model: Model) -> list[Placement]:
        """The model's routable READY placements, at most a second old: a drain or a new
        replica reaches routing within a second, well inside the heartbeat interval."""

        async def load() -> list[Placement]:
            return [placement async for placement in Placement.objects.ready_for(model)]

        return await self._remember("placements", model.model_id, load, most=1.0, stale_for=5)

    def forget_placements(self, model: Model) -> None:
        """A load just finished here: the next request must not see the empty list from
        before."""
        self.memory.entries.pop(("placements", model.model_id), None)
