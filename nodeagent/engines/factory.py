"""Making the engine for a load: which kind, its arguments, port, environment and user,
and a standby engine taken where one is ready.

Engines get a minimal environment (no token, no store credentials) and, where the
operator set one, a user of their own (nodeagent.engines.identity); a vLLM engine
becomes one of the standbys (nodeagent.engines.standby) unless its arguments rule
that out. The load pipeline (nodeagent.loading) starts what `EngineFactory.create`
makes.
"""

from __future__ import annotations

import asyncio
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from urllib.parse import quote

from nodeagent.cache import CachedModel
from nodeagent.compilecache import CompileCache
from nodeagent.config import AgentConfig
from nodeagent.engines import identity
from nodeagent.engines.base import Engine
from nodeagent.engines.identity import EngineUser, engine_environment
from nodeagent.engines.sim import SimEngine
from nodeagent.engines.standby import StandbyPool, is_pooling, lora_limits, standby_refusal
from nodeagent.engines.vllm import VllmEngine, vllm_argv
from nodeagent.kvevents import KvFeed
from nodeagent.metrics import AgentMetrics
from nodeagent.protocol import LoadModelRequest


class EngineFactory:
    """The engines' environment, user and standby pool, and the engine each load gets."""

    def __init__(
        self, config: AgentConfig, metrics: AgentMetrics, gpu: bool, environ: Mapping[str, str]
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.gpu = gpu
        self.environ = environ
        self.engine_user = EngineUser.lookup(config.engine_user)
        self.engine_home = config.cache_dir / "engine-home"
        self.engine_environ = engine_environment(environ, config.engine_env, self.engine_home)
        self.standbys: StandbyPool | None = None

    def prepare(self) -> None:
        """What every engine writes to, made (and given to the engine user) once at start: its
        home and vLLM's cache root for the standbys."""
        for directory in (self.engine_home, Path(self.environ["VLLM_CACHE_ROOT"])):
            directory.mkdir(parents=True, exist_ok=True)
            identity.own(self.engine_user, directory)

    def start_standbys(self, gpu_count: int) -> None:
        """Keep the configured number of standby engines ready (needs the running loop)."""
        count = self.config.standby_count(gpu_count)
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

    async def close(self) -> None:
        """Stop the standby engines: nothing outlives the agent."""
        if self.standbys is not None:
            await self.standbys.close()

    async def create(
        self, request: LoadModelRequest, cached: CachedModel, deadline: float,
        compile_cache: CompileCache | None = None,
    ) -> Engine:  # fmt: skip
        """The engine for the load, not started: a simulated one, or vLLM (a standby that
        becomes it where one is ready, `deadline` bounding the wait for one)."""
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
            otlp_traces_endpoint=self.config.traces_endpoint,
        )
        environ = self._vllm_environ(request, compile_cache)
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

    def _vllm_environ(
        self, request: LoadModelRequest, compile_cache: CompileCache | None
    ) -> dict[str, str]:
        """The engines' environment, with this engine's compile cache and LoRA switches."""
        environ = dict(self.engine_environ)
        if compile_cache is not None:
            environ["VLLM_CACHE_ROOT"] = str(compile_cache.root)
            compile_cache.root.mkdir(parents=True, exist_ok=True)
            identity.own(self.engine_user, compile_cache.root)
        if lora_limits(request.engine.args)[0]:  # adapters are loaded as they are asked for
            environ["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"
        if self.config.traces_endpoint:
            # vLLM's exporter speaks gRPC unless told; the agent's endpoint is OTLP/HTTP. The
            # exporter's headers are not passed on (an engine gets no secrets): name them in
            # AGENT_ENGINE_ENV where the collector wants them.
            environ["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] = "http/protobuf"
            environ.setdefault("OTEL_SERVICE_NAME", "vllm")
        return environ

    def _kv_feed(self, request: LoadModelRequest) -> KvFeed | None:
        """Where the engine is to publish its KV-cache events (an embedding model's engine
        keeps no prefix cache): the agent's feed of them, read once the engine serves."""
        if not self.config.kv_events or is_pooling(request.engine.args):
            return None
        dropped = self.metrics.kv_events_dropped
        return KvFeed(request.model_id, lambda reason: dropped.labels(reason).inc())


def engine_tmp_dir() -> Path:
    """A fresh, short temporary directory for one engine, removed when it stops.

    vLLM binds ZMQ IPC sockets under TMPDIR, and a Unix socket path may not exceed
    107 bytes: a directory under a deep cache path (or a long TMPDIR) breaks its start.
    """
    base = tempfile.gettempdir()
    if len(base) > 32:
        base = "/tmp"  # noqa: S108 - only for its short path; the directory is private (0700)
    return Path(tempfile.mkdtemp(prefix="llmfleet-", dir=base))


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
