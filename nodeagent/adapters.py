"""LoRA adapters inside a model's engine: loaded on their first request, at most `max_loras`.

A request for an adapter arrives on the base model's proxy path with the
ADAPTER_HEADERS (the gateway's catalog says which source and revision). If the
engine does not hold the adapter yet, its files come through the same
downloader, manifest check and cache as a model's (one directory per adapter,
marked `adapter_of` the base, evicted by the same LRU), and the engine loads it
(`/v1/load_lora_adapter` of vLLM's runtime LoRA updating). Concurrent first requests
for one adapter on one engine share one load. An engine holds at most
`max_loras` adapters: the least recently used one with no request in flight is
unloaded to make room, and when every held adapter is serving the new one waits
for no one: the request is refused with 503 (the gateway tries another replica).

What an engine holds ends with it: a new engine (a restart, a reload) starts with
none, and heartbeats say so, which is how the control plane learns an engine lost
its adapters.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import aiohttp

from nodeagent.cache import CachedModel, ModelCache
from nodeagent.download import DownloadProgress, DownloadSettings
from nodeagent.engines.base import Engine, EngineError, load_lora, unload_lora
from nodeagent.fetch import fetch_model
from nodeagent.metrics import AgentMetrics
from nodeagent.protocol import AdapterRef, AdapterStatus
from nodeagent.store import StoreError, open_store

log = logging.getLogger(__name__)

# A request whose adapter another revision replaced while it waited gives up after this many
# loads (each one real): an adapter flip-flopping between revisions must not hold it forever.
_ACQUIRE_TRIES = 3


class AdapterError(RuntimeError):
    """An adapter that cannot be loaded or unloaded: `code` and HTTP `status` for the answer."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class LoadedAdapter:
    ref: AdapterRef
    directory: Path
    loaded_at: float
    load_seconds: float
    last_used: float
    in_flight: int = 0
    requests_total: int = 0

    def status(self) -> AdapterStatus:
        return AdapterStatus(
            adapter_id=self.ref.adapter_id,
            requests_total=self.requests_total,
            requests_in_flight=self.in_flight,
            loaded_at=datetime.fromtimestamp(self.loaded_at, UTC),
            last_used_at=datetime.fromtimestamp(self.last_used, UTC),
            load_seconds=self.load_seconds,
        )


@dataclass
class EngineAdapters:
    """The adapters one running engine holds; a new engine starts with a new, empty one."""

    engine: Engine
    max_loras: int  # 0: the engine was started without LoRA
    max_rank: int
    loaded: dict[str, LoadedAdapter] = field(default_factory=dict)
    # One load per adapter, source and revision at a time: concurrent requests share it.
    pending: dict[AdapterRef, asyncio.Task[LoadedAdapter]] = field(default_factory=dict)
    # Requests waiting on an adapter's load and not yet counted in flight on it: no other
    # load may unload it from under them meanwhile.
    waiting: Counter[str] = field(default_factory=Counter)
    # One change of what the engine holds at a time: the room check and the engine's load
    # (or unload) are one step, so two loads never both take the last slot.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def statuses(self) -> tuple[AdapterStatus, ...]:
        return tuple(self.loaded[name].status() for name in sorted(self.loaded))

    def idle(self, adapter: LoadedAdapter) -> bool:
        return adapter.in_flight == 0 and self.waiting[adapter.ref.adapter_id] == 0

    def least_recently_used_idle(self) -> LoadedAdapter | None:
        idle = [adapter for adapter in self.loaded.values() if self.idle(adapter)]
        return min(idle, key=lambda adapter: adapter.last_used, default=None)

    def holds(self, adapter_id: str) -> bool:
        return adapter_id in self.loaded or any(
            ref.adapter_id == adapter_id for ref in self.pending
        )


def adapter_rank(directory: Path) -> int | None:
    """The rank (`r`) its adapter_config.json says, or None when it says none."""
    try:
        config = json.loads((directory / "adapter_config.json").read_text())
    except (OSError, ValueError):
        return None
    rank = config.get("r") if isinstance(config, dict) else None
    return rank if isinstance(rank, int) and rank > 0 else None


class AdapterLoader:
    """Gets adapters into engines (and out again) for the registry."""

    def __init__(
        self,
        cache: ModelCache,
        settings: DownloadSettings,
        environ: dict[str, str],
        metrics: AgentMetrics,
        load_timeout: float,
        make_room: Callable[[int, str], None],
        on_cached: Callable[[CachedModel], None],
    ) -> None:
        self.cache = cache
        self.settings = settings
        self.environ = environ
        self.metrics = metrics
        self.load_timeout = load_timeout
        self.make_room = make_room
        self.on_cached = on_cached  # an adapter's files are in the cache (counted, evictable)

    async def acquire(
        self, adapters: EngineAdapters, ref: AdapterRef, session: aiohttp.ClientSession
    ) -> LoadedAdapter:
        """The adapter in the engine with this request counted in flight on it (the caller
        calls `release`): loaded first if need be, sharing a load already under way."""
        for _ in range(_ACQUIRE_TRIES):
            loaded = await self.ensure(adapters, ref, session)
            # Checked again after the wait, with no await between the check and the count.
            if adapters.loaded.get(ref.adapter_id) is loaded:
                loaded.in_flight += 1
                loaded.requests_total += 1
                loaded.last_used = time.time()
                return loaded
        raise AdapterError(
            "adapters_busy",
            f"{ref.adapter_id} was replaced in this engine while the request waited for it",
            503,
        )

    async def ensure(
        self, adapters: EngineAdapters, ref: AdapterRef, session: aiohttp.ClientSession
    ) -> LoadedAdapter:
        """The adapter (this source and revision) in the engine, loaded first if need be."""
        loaded = adapters.loaded.get(ref.adapter_id)
        if loaded is not None and loaded.ref == ref:
            return loaded
        adapters.waiting[ref.adapter_id] += 1
        try:
            return await self._load_once(adapters, ref, session)
        finally:
            adapters.waiting[ref.adapter_id] -= 1
            if adapters.waiting[ref.adapter_id] <= 0:
                del adapters.waiting[ref.adapter_id]

    @staticmethod
    def release(adapter: LoadedAdapter) -> None:
        adapter.in_flight -= 1
        adapter.last_used = time.time()

    async def _load_once(
        self, adapters: EngineAdapters, ref: AdapterRef, session: aiohttp.ClientSession
    ) -> LoadedAdapter:
        task = adapters.pending.get(ref)
        if task is None or task.done():
            # No await between the check and the assignment: concurrent requests share it.
            task = asyncio.create_task(self._load(adapters, ref, session))
            adapters.pending[ref] = task

            def forget(done: asyncio.Task[LoadedAdapter], key: AdapterRef = ref) -> None:
                if adapters.pending.get(key) is done:
                    del adapters.pending[key]

            task.add_done_callback(forget)
        # Shielded: a client that leaves does not cancel the load others may be waiting on.
        return await asyncio.shield(task)

    async def _load(
        self, adapters: EngineAdapters, ref: AdapterRef, session: aiohttp.ClientSession
    ) -> LoadedAdapter:
        started = time.monotonic()
        try:
            loaded = await self._fetch_and_load(adapters, ref, session, started)
        except AdapterError:
            self.metrics.adapter_loads.labels("failed").inc()
            raise
        except Exception as exc:  # a full disk, permissions: this agent's, another may serve
            log.exception("loading adapter %s failed", ref.adapter_id)
            self.metrics.adapter_loads.labels("failed").inc()
            raise AdapterError(
                "adapter_unavailable",
                f"adapter {ref.adapter_id} could not be loaded here: {type(exc).__name__}: {exc}",
                503,
            ) from None
        self.metrics.adapter_loads.labels("loaded").inc()
        self.metrics.adapter_load_seconds.observe(loaded.load_seconds)
        log.info("adapter %s loaded in %.3f s", ref.adapter_id, loaded.load_seconds)
        return loaded

    async def _fetch_and_load(
        self,
        adapters: EngineAdapters,
        ref: AdapterRef,
        session: aiohttp.ClientSession,
        started: float,
    ) -> LoadedAdapter:
        if adapters.max_loras <= 0:
            raise AdapterError(
                "lora_disabled",
                "this engine was started without LoRA (--enable-lora): it cannot load "
                f"{ref.adapter_id}",
                409,
            )
        base = adapters.engine.model_id
        deadline = asyncio.get_running_loop().time() + self.load_timeout
        try:
            fetched = await fetch_model(
                self.cache, [ref.source], lambda uri: open_store(uri, session, self.environ),
                ref.adapter_id, ref.revision, DownloadProgress(), self.settings, deadline,
                _room(self.make_room, ref.adapter_id), adapter_of=base,
            )  # fmt: skip
        except StoreError as exc:
            # No room on this agent's disk is this agent's; anything else is the adapter's
            # own (its source, its files), whichever replica loads it.
            code = "cache_full" if exc.code == "cache_full" else f"adapter_{exc.code}"
            raise AdapterError(code, f"adapter {ref.adapter_id}: {exc}", exc.status) from None
        cached = fetched.cached
        self.on_cached(cached)
        rank = adapter_rank(cached.directory)
        if rank is None:
            raise AdapterError(
                "adapter_invalid",
                f"adapter {ref.adapter_id} has no adapter_config.json with a rank `r`",
                422,
            )
        if rank > adapters.max_rank:
            raise AdapterError(
                "adapter_rank_too_high",
                f"adapter {ref.adapter_id} has rank {rank}; this engine takes at most "
                f"{adapters.max_rank} (--max-lora-rank)",
                422,
            )
        async with adapters.lock:
            old = adapters.loaded.get(ref.adapter_id)
            if old is not None and old.ref == ref:
                return old  # a load of the same finished while this one fetched
            if old is not None:  # another source or revision of it: that one goes first
                if old.in_flight:
                    raise AdapterError(
                        "adapters_busy",
                        f"{ref.adapter_id}'s other revision is serving requests here",
                        503,
                    )
                await self._unload(adapters, old, session, "request")
            while len(adapters.loaded) >= adapters.max_loras:
                victim = adapters.least_recently_used_idle()
                if victim is None:
                    raise AdapterError(
                        "adapters_busy",
                        f"all {adapters.max_loras} adapter slots of {base}'s engine are "
                        "serving requests",
                        503,
                    )
                await self._unload(adapters, victim, session, "lru")
            try:
                await load_lora(session, adapters.engine.url, ref.adapter_id, cached.directory)
            except EngineError as exc:  # the engine answered: it will not take these files
                raise AdapterError(
                    "adapter_load_failed", f"adapter {ref.adapter_id}: {exc}", 422
                ) from None
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise AdapterError(
                    "engine_unreachable", f"the engine did not answer: {exc}", 502
                ) from None
            now = time.time()
            loaded = LoadedAdapter(
                ref, cached.directory, now, time.monotonic() - started, last_used=now
            )
            adapters.loaded[ref.adapter_id] = loaded
            self.cache.touch(ref.adapter_id)
            return loaded

    async def unload(
        self,
        adapters: EngineAdapters,
        adapter_id: str,
        session: aiohttp.ClientSession,
        force: bool,
    ) -> None:
        async with adapters.lock:
            loaded = adapters.loaded.get(adapter_id)
            if loaded is None:
                raise AdapterError(
                    "adapter_not_found", f"{adapter_id} is not loaded in this engine", 404
                )
            if loaded.in_flight and not force:
                raise AdapterError(
                    "requests_in_flight",
                    f"{loaded.in_flight} request(s) in flight on {adapter_id}; wait, or send "
                    "force=true",
                    409,
                )
            await self._unload(adapters, loaded, session, "request")

    async def _unload(
        self,
        adapters: EngineAdapters,
        loaded: LoadedAdapter,
        session: aiohttp.ClientSession,
        reason: str,
    ) -> None:
        """Out of the engine. No request is routed to it from the moment it starts going (it
        leaves `loaded` first); should the engine keep it, it is back as it was."""
        name = loaded.ref.adapter_id
        del adapters.loaded[name]
        try:
            await unload_lora(session, adapters.engine.url, name)
        except EngineError as exc:
            adapters.loaded[name] = loaded
            raise AdapterError(
                "adapters_busy", f"adapter {name} would not unload: {exc}", 503
            ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            adapters.loaded[name] = loaded
            raise AdapterError(
                "engine_unreachable", f"the engine did not answer: {exc}", 502
            ) from None
        self.metrics.adapter_unloads.labels(reason).inc()
        log.info("adapter %s unloaded (%s)", name, reason)


def _room(
    make_room: Callable[[int, str], None], adapter_id: str
) -> Callable[[int], Awaitable[None]]:
    async def room(needed: int) -> None:
        make_room(needed, adapter_id)

    return room
