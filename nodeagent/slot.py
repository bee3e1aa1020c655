"""One model on this agent: its state, its files, its engine and the load under way.

A `ModelSlot` is the registry's (nodeagent.registry), which holds one per model and
takes its lock for every transition; the load pipeline (nodeagent.loading) fills it in
as a cold load goes. Its state moves only through nodeagent.lifecycle.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nodeagent.adapters import EngineAdapters
from nodeagent.download import DownloadProgress
from nodeagent.engines.base import Engine
from nodeagent.metrics import EngineStats
from nodeagent.protocol import CacheLevel, LoadModelResponse, ModelState, ModelStatus


@dataclass
class ModelSlot:
    """A model's place on this agent, from its first load until it leaves the cache."""

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

    def status(self, endpoint: str) -> ModelStatus:
        """What heartbeats and progress reports say of it; `endpoint` is its inference URL,
        given only while it serves."""
        serving = self.serving
        stats = self.stats if serving else EngineStats()
        total = self.progress.total
        adapters = self.adapters if serving else None
        return ModelStatus(
            model_id=self.model_id,
            cache_state=self.state,
            cache_level=self.cache_level,
            inference_endpoint_url=endpoint if serving else "",
            engine=self.engine.name if self.engine is not None else "",
            progress=min(self.progress.done / total, 1.0) if total else None,
            bytes_done=self.progress.done,
            bytes_total=total,
            download_bytes_per_s=(
                self.progress.bytes_per_second if self.state == ModelState.DOWNLOADING else None
            ),
            kv_cache_usage=stats.kv_cache_usage,
            kv_cache_hit_rate=stats.kv_cache_hit_rate,
            requests_running=stats.requests_running,
            requests_waiting=stats.requests_waiting,
            requests_in_flight=self.in_flight,
            last_used_at=_utc(self.last_used),
            error=self.error,
            phase=self.phase,
            max_loras=adapters.max_loras if adapters else 0,
            max_lora_rank=adapters.max_rank if adapters else 0,
            max_num_seqs=self.engine.max_num_seqs if serving and self.engine else 0,
            adapters=adapters.statuses() if adapters else (),
        )


def _utc(timestamp: float | None) -> datetime | None:
    return None if timestamp is None else datetime.fromtimestamp(timestamp, UTC)
