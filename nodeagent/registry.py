"""The models on this agent and their lifecycle: load, sleep, wake, stop, delete.

One `ModelSlot` (nodeagent.slot) per model. A load runs as one task per model that
every concurrent `load_model` call for it awaits (so a second call joins the first
instead of starting a second engine); transitions of a slot hold its lock. A cold
load's steps (fetch, compile cache, engine, readiness, timings) are the load
pipeline's (nodeagent.loading); the registry answers it, fails it, or wakes a
sleeping engine instead, and keeps unloads, eviction, adapters and status.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping
from typing import Any

import aiohttp

from nodeagent import engineargs, lifecycle
from nodeagent.adapters import AdapterError, AdapterLoader, EngineAdapters, LoadedAdapter
from nodeagent.cache import CachedModel, CacheEntry, ModelCache, plan_eviction
from nodeagent.config import AgentConfig
from nodeagent.download import DownloadSettings
from nodeagent.engines.base import Engine, EngineError, read_stats, sleep_engine, wake_engine
from nodeagent.errors import AgentError
from nodeagent.loading import LoadPipeline
from nodeagent.metrics import AgentMetrics
from nodeagent.protocol import (
    AdapterRef,
    AgentReportedState,
    CacheLevel,
    LoadModelRequest,
    LoadModelResponse,
    LoadTimings,
    ModelState,
    ModelStatus,
    UnloadAdapterRequest,
    UnloadModelRequest,
    UnloadModelResponse,
)
from nodeagent.slot import ModelSlot
from nodeagent.store import StoreError

log = logging.getLogger(__name__)

_ERROR_STATUS = {"engine_exited": 502, "engine_start_failed": 502, "load_timeout": 504}


class ModelRegistry:
    """The agent's models, one slot each: their loads (run by `loads`), unloads, the cache's
    room, their engines' adapters and what heartbeats report of them."""

    def __init__(
        self, config: AgentConfig, metrics: AgentMetrics, gpu: bool, environ: Mapping[str, str]
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.environ = dict(environ)
        self.environ.setdefault("VLLM_CACHE_ROOT", str(config.cache_dir / "vllm-cache"))
        self.cache = ModelCache(config.models_dir)
        self.download_settings = DownloadSettings(
            concurrency=config.download_concurrency,
            range_bytes=config.download_range_bytes,
            bandwidth_limit=config.download_limit_bytes_per_s or None,
            direct_io=config.download_direct_io,
        )
        self.slots: dict[str, ModelSlot] = {}
        # LoRA adapters' files in the cache (in no engine's slot: they are not models here).
        self.adapter_files: dict[str, CachedModel] = {}
        self.adapter_loader = AdapterLoader(
            self.cache, self.download_settings, self.environ, metrics, config.load_timeout,
            self._make_room, lambda cached: self.adapter_files.__setitem__(cached.model_id, cached),
        )  # fmt: skip
        self._watchers: set[asyncio.Task[None]] = set()
        # Engines whose end was counted and reported as they were found gone.
        self._lost: weakref.WeakSet[Engine] = weakref.WeakSet()
        # Told of every phase change of a load (the progress reporter's poke).
        self.on_phase: Callable[[], None] = lambda: None
        self.loads = LoadPipeline(
            config, metrics, gpu, self.environ, self.cache, self.download_settings,
            make_room=self._make_room, on_phase=lambda: self.on_phase(), watch=self._watch,
        )  # fmt: skip

    def endpoint_for(self, model_id: str) -> str:
        return f"{self.config.advertise_url}/models/{model_id}"

    def restore(self) -> None:
        """Rebuild the index from disk at start: cached models are NVME_CACHED, no engine runs."""
        for cached in self.cache.scan():
            if cached.adapter_of:
                self.adapter_files[cached.model_id] = cached
                continue
            self.slots[cached.model_id] = ModelSlot(
                model_id=cached.model_id,
                cache_level=CacheLevel.NVME_CACHED,
                source=cached.source,
                revision=cached.revision,
                directory=cached.directory,
                size_bytes=cached.size,
                last_used=cached.last_used,
            )
        if self.slots:
            log.info("cache holds %d model(s): %s", len(self.slots), ", ".join(sorted(self.slots)))

    # --- load -------------------------------------------------------------------------------

    async def load(
        self, request: LoadModelRequest, session: aiohttp.ClientSession
    ) -> LoadModelResponse:
        """Serve the model on the GPU; a call while a load runs joins that load. Engine
        arguments outside the policy (nodeagent.engineargs) are refused before anything."""
        self._check_engine(request)
        slot = self.slots.setdefault(request.model_id, ModelSlot(request.model_id))
        # No await between the check and the assignment: concurrent calls see the same task.
        task = slot.load_task
        if task is None or task.done():
            task = slot.load_task = asyncio.create_task(self._load(slot, request, session))
        return await asyncio.shield(task)

    def _check_engine(self, request: LoadModelRequest) -> None:
        """Whatever the control plane sent (an older one checks nothing), an engine starts only
        with allowed arguments, and runs the checkpoint's code only where this host allows it."""
        try:
            engineargs.check(request.engine.args)
        except engineargs.EngineArgsRefused as exc:
            raise AgentError("engine_args_refused", str(exc), 400, request.model_id) from None
        if request.engine.trust_remote_code and not self.config.allow_remote_code:
            raise AgentError(
                "remote_code_refused",
                "this agent does not run checkpoint code (AGENT_ALLOW_REMOTE_CODE=false)",
                403,
                request.model_id,
            )

    async def _load(
        self, slot: ModelSlot, request: LoadModelRequest, session: aiohttp.ClientSession
    ) -> LoadModelResponse:
        started = time.monotonic()
        async with slot.lock:
            # Any of the model's sources: they hold the same manifest (register_model checks).
            sources = {source.uri for source in request.all_sources}
            same = slot.source in sources and slot.revision == request.revision
            if slot.serving and same:
                return self._loaded(
                    slot, LoadTimings(total_seconds=0.0, files_cached=True, source=slot.source)
                )
            if slot.engine is not None and slot.cache_level == CacheLevel.DRAM_CACHED and same:
                return await self._wake(slot, session, started)
            if slot.engine is not None:  # another source or revision is asked for: replace it
                await self._stop_engine(slot)
            try:
                timings = await self.loads.cold_load(slot, request, session, started)
                return self._loaded(slot, timings)
            except (EngineError, StoreError) as exc:
                status = (
                    exc.status if isinstance(exc, StoreError) else _ERROR_STATUS.get(exc.code, 502)
                )
                self._fail(slot, str(exc))
                raise AgentError(exc.code, str(exc), status, slot.model_id) from None
            except asyncio.CancelledError:
                self._fail(slot, "the load was cancelled")
                raise
            except Exception as exc:  # disk full, permissions: still an answer, never a stuck slot
                log.exception("load of %s failed", slot.model_id)
                self._fail(slot, f"{type(exc).__name__}: {exc}")
                raise AgentError(
                    "load_failed", f"{type(exc).__name__}: {exc}", 500, slot.model_id
                ) from None

    async def _wake(
        self, slot: ModelSlot, session: aiohttp.ClientSession, started: float
    ) -> LoadModelResponse:
        assert slot.engine is not None
        try:
            await wake_engine(session, slot.engine.url)
        except (EngineError, aiohttp.ClientError) as exc:
            raise AgentError("wake_failed", str(exc), 502, slot.model_id) from None
        elapsed = time.monotonic() - started
        return self._loaded(
            slot,
            LoadTimings(
                wake_seconds=elapsed, total_seconds=elapsed, files_cached=True, source=slot.source
            ),
        )

    def _loaded(self, slot: ModelSlot, timings: LoadTimings) -> LoadModelResponse:
        lifecycle.move(slot, ModelState.READY)
        self.on_phase()
        slot.cache_level, slot.error = CacheLevel.GPU_RESIDENT, ""
        slot.last_used = time.time()
        self.cache.touch(slot.model_id)
        adapters = slot.adapters
        return LoadModelResponse(
            slot.model_id, self.endpoint_for(slot.model_id), timings,
            max_loras=adapters.max_loras if adapters else 0,
            max_lora_rank=adapters.max_rank if adapters else 0,
            max_num_seqs=slot.engine.max_num_seqs if slot.engine is not None else 0,
        )  # fmt: skip

    def _fail(self, slot: ModelSlot, error: str) -> None:
        lifecycle.move(slot, ModelState.FAILED)
        self.on_phase()
        slot.error, slot.failed_before = error, True
        slot.cache_level = (
            CacheLevel.NVME_CACHED
            if slot.directory is not None and slot.directory.exists()
            else CacheLevel.NONE
        )
        log.warning("model %s failed: %s", slot.model_id, error)

    def _make_room(self, needed: int, model_id: str) -> None:
        """Delete unused cached models and adapters, least recently used first, until `needed`
        bytes fit."""
        entries = [
            CacheEntry(slot.model_id, slot.size_bytes, slot.last_used or 0.0,
                       in_use=slot.engine is not None or slot.loading)
            for slot in self.slots.values()
            if slot.directory is not None and slot.model_id != model_id
        ]  # fmt: skip
        held = {
            adapter_id
            for slot in self.slots.values()
            if slot.adapters is not None
            for adapter_id in (*slot.adapters.loaded, *slot.adapters.pending)
        }
        entries += [
            CacheEntry(adapter_id, cached.size, cached.last_used, in_use=adapter_id in held)
            for adapter_id, cached in self.adapter_files.items()
            if adapter_id != model_id
        ]
        disk_free = shutil.disk_usage(self.config.models_dir).free
        plan = plan_eviction(entries, needed, self.config.cache_max_bytes or None, disk_free)
        if plan is None:
            raise StoreError(
                "cache_full",
                f"{model_id} needs {needed} bytes; the cache cannot make room without "
                "deleting models in use",
                507,
            )
        for victim in plan:
            log.info("evicting %s from the cache to make room for %s", victim, model_id)
            self.cache.remove(victim)
            self.slots.pop(victim, None)
            self.adapter_files.pop(victim, None)
            self.metrics.evictions.inc()

    def engine_died(self, engine: Engine, detail: str) -> None:
        """An engine found unable to serve while its process still runs (the proxy saw its
        EngineCore gone): its model is FAILED now, as a crash would leave it, and what is
        left of it is stopped (the GPU memory it holds is freed)."""
        slot = self.slots.get(engine.model_id)
        if slot is None or slot.engine is not engine:
            return  # noticed already
        self._engine_lost(slot, engine, detail)
        self._background(engine.stop())

    def _watch(self, slot: ModelSlot, engine: Engine) -> None:
        """Notice an engine that ends on its own: the next heartbeat reports the model FAILED."""

        async def watch() -> None:
            ended = await engine.wait()
            if engine in self._lost:  # counted and reported when it was found gone
                return
            if ended.expected:
                self.metrics.engine_exits.labels(engine.name, "stopped").inc()
            elif slot.engine is engine:
                self._engine_lost(slot, engine, ended.detail)
            else:
                self.metrics.engine_exits.labels(engine.name, "crashed").inc()

        self._background(watch())

    def _engine_lost(self, slot: ModelSlot, engine: Engine, detail: str) -> None:
        """The slot's engine is gone (it crashed, or cannot serve): the model is FAILED."""
        self._lost.add(engine)
        slot.engine, slot.adapters = None, None
        if engine.kv_feed is not None:  # its followers learn at once that its blocks are gone
            self._background(engine.kv_feed.close())
        self.metrics.engine_exits.labels(engine.name, "crashed").inc()
        self._fail(slot, f"engine died: {detail}")

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    # --- unload -----------------------------------------------------------------------------

    def _slot(self, model_id: str) -> ModelSlot:
        """The model's slot, or the 404 that says it is not here."""
        slot = self.slots.get(model_id)
        if slot is None:
            raise AgentError("model_not_found", f"{model_id} is not on this agent", 404, model_id)
        return slot

    async def unload(
        self, request: UnloadModelRequest, session: aiohttp.ClientSession
    ) -> UnloadModelResponse:
        """Step the model down to `request.to`, or lower where the engine cannot sleep."""
        slot = self._slot(request.model_id)
        if slot.loading:
            raise AgentError(
                "load_in_progress",
                "the model is loading; unload it once loaded",
                409,
                slot.model_id,
            )
        if slot.in_flight and not request.force:
            raise AgentError(
                "requests_in_flight",
                f"{slot.in_flight} request(s) in flight; wait, or send force=true",
                409,
                slot.model_id,
            )
        async with slot.lock:
            note = await self._step_down(slot, request.to, session)
        self.cache.touch(slot.model_id)
        response = UnloadModelResponse(slot.model_id, slot.state, slot.cache_level, note)
        if slot.cache_level == CacheLevel.NONE:
            del self.slots[slot.model_id]
        return response

    async def _step_down(self, slot: ModelSlot, to: str, session: aiohttp.ClientSession) -> str:
        if to == CacheLevel.DRAM_CACHED and slot.engine is not None and slot.engine.supports_sleep:
            if slot.cache_level != CacheLevel.DRAM_CACHED:
                try:
                    await sleep_engine(session, slot.engine.url)
                except (EngineError, aiohttp.ClientError) as exc:
                    raise AgentError("sleep_failed", str(exc), 502, slot.model_id) from None
                if slot.engine.kv_feed is not None:  # asleep, it holds no KV
                    slot.engine.kv_feed.clear()
            lifecycle.move(slot, ModelState.UNLOADED)
            slot.cache_level = CacheLevel.DRAM_CACHED
            return ""
        note = ""
        if to == CacheLevel.DRAM_CACHED:
            note = (
                f"the {slot.engine.name} engine cannot sleep on this host; "
                "stepped down to NVME_CACHED"
                if slot.engine is not None
                else "no engine runs; the model stays at its level"
            )
        lifecycle.move(slot, ModelState.UNLOADING)
        await self._stop_engine(slot)
        lifecycle.move(slot, ModelState.UNLOADED)
        if to == CacheLevel.NONE:
            self.cache.remove(slot.model_id)
            slot.directory, slot.cache_level, slot.size_bytes = None, CacheLevel.NONE, 0
        elif slot.directory is not None and slot.directory.exists():
            slot.cache_level = CacheLevel.NVME_CACHED
        return note

    async def _stop_engine(self, slot: ModelSlot) -> None:
        # Its adapters go with it: a new engine starts with none.
        engine, slot.engine, slot.adapters = slot.engine, None, None
        if engine is not None:
            await engine.stop()

    # --- LoRA adapters (nodeagent.adapters) ----------------------------------------------------

    def _engine_adapters(self, model_id: str) -> EngineAdapters:
        slot = self._slot(model_id)
        if not slot.serving or slot.adapters is None:
            raise AgentError(
                "model_not_ready", f"{model_id} is {slot.state} ({slot.cache_level})", 503, model_id
            )
        return slot.adapters

    async def acquire_adapter(
        self, model_id: str, ref: AdapterRef, session: aiohttp.ClientSession
    ) -> LoadedAdapter:
        """The adapter loaded into the model's engine, with one more request in flight on it;
        give it back with `release_adapter`."""
        adapters = self._engine_adapters(model_id)
        try:
            return await self.adapter_loader.acquire(adapters, ref, session)
        except AdapterError as exc:
            raise AgentError(exc.code, str(exc), exc.status, model_id) from None

    async def load_adapter(
        self, model_id: str, ref: AdapterRef, session: aiohttp.ClientSession
    ) -> LoadedAdapter:
        """The adapter loaded into the model's engine ahead of its requests (nothing counted)."""
        adapters = self._engine_adapters(model_id)
        try:
            return await self.adapter_loader.ensure(adapters, ref, session)
        except AdapterError as exc:
            raise AgentError(exc.code, str(exc), exc.status, model_id) from None

    def release_adapter(self, adapter: LoadedAdapter) -> None:
        self.adapter_loader.release(adapter)

    async def unload_adapter(
        self, request: UnloadAdapterRequest, session: aiohttp.ClientSession
    ) -> None:
        adapters = self._engine_adapters(request.model_id)
        try:
            await self.adapter_loader.unload(adapters, request.adapter_id, session, request.force)
        except AdapterError as exc:
            raise AgentError(exc.code, str(exc), exc.status, request.model_id) from None

    # --- reporting ------------------------------------------------------------------------------

    async def refresh_stats(self, session: aiohttp.ClientSession) -> None:
        """Read every serving engine's /metrics at once (each with a short timeout)."""
        serving = [slot for slot in self.slots.values() if slot.serving and slot.engine is not None]
        results = await asyncio.gather(
            *(read_stats(session, slot.engine.url) for slot in serving if slot.engine)
        )
        for slot, stats in zip(serving, results, strict=True):
            if stats is not None:
                slot.stats = stats

    def statuses(self) -> list[ModelStatus]:
        slots = sorted(self.slots.values(), key=lambda s: s.model_id)
        return [slot.status(self.endpoint_for(slot.model_id)) for slot in slots]

    def loading_statuses(self) -> list[ModelStatus]:
        """The models whose loads run now: what a progress report carries."""
        loading = [slot for slot in self.slots.values() if slot.loading]
        return [slot.status(self.endpoint_for(slot.model_id)) for slot in loading]

    def agent_state(self) -> AgentReportedState:
        if not os.access(self.config.cache_dir, os.W_OK):
            return AgentReportedState.DEGRADED  # it cannot load anything new
        if any(slot.loading for slot in self.slots.values()):
            return AgentReportedState.LOADING_MODEL
        if any(slot.in_flight for slot in self.slots.values()):
            return AgentReportedState.INFERRING
        return AgentReportedState.IDLE

    def models_bytes(self) -> int:
        models = sum(slot.size_bytes for slot in self.slots.values() if slot.directory is not None)
        return models + sum(cached.size for cached in self.adapter_files.values())

    async def stop_all(self) -> None:
        """Cancel loads and stop every engine and standby: nothing outlives the agent."""
        await self.loads.close()
        for slot in self.slots.values():
            if slot.load_task is not None and not slot.load_task.done():
                slot.load_task.cancel()
        await asyncio.gather(
            *(slot.load_task for slot in self.slots.values() if slot.load_task),
            return_exceptions=True,
        )
        await asyncio.gather(*(self._stop_engine(slot) for slot in self.slots.values()))
