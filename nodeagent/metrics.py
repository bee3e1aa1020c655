"""Prometheus metrics of the agent, and reading an engine's own metrics.

vLLM renames metrics between versions, so each figure is read under its new
name and, failing that, its old one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import HistogramMetricFamily
from prometheus_client.parser import text_string_to_metric_families

# (new name, old name) of each vLLM series the agent reads.
_RUNNING = ("vllm:num_requests_running",)
_WAITING = ("vllm:num_requests_waiting",)
_KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total")
_PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total")
_TTFT = "vllm:time_to_first_token_seconds"


@dataclass(frozen=True)
class EngineStats:
    """What an engine's /metrics says about its load. None where it says nothing."""

    requests_running: int = 0
    requests_waiting: int = 0
    kv_cache_usage: float | None = None
    prefix_cache_queries: float | None = None
    prefix_cache_hits: float | None = None
    # vLLM's time-to-first-token histogram, summed over its labels: (upper bound, cumulative
    # count) per bucket, +Inf last; empty where the engine reports none.
    ttft_buckets: tuple[tuple[float, float], ...] = ()
    ttft_sum: float = 0.0

    @property
    def kv_cache_hit_rate(self) -> float | None:
        if not self.prefix_cache_queries or self.prefix_cache_hits is None:
            return None
        return self.prefix_cache_hits / self.prefix_cache_queries


def parse_engine_metrics(text: str) -> EngineStats:
    """Sum each series over its labels (engines, model names), preferring the new names."""
    totals: dict[str, float] = {}
    buckets: dict[float, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            totals[sample.name] = totals.get(sample.name, 0.0) + sample.value
            if sample.name == _TTFT + "_bucket":
                bound = float(sample.labels.get("le", "+Inf"))
                buckets[bound] = buckets.get(bound, 0.0) + sample.value

    def first(names: tuple[str, ...]) -> float | None:
        return next((totals[name] for name in names if name in totals), None)

    return EngineStats(
        requests_running=int(first(_RUNNING) or 0),
        requests_waiting=int(first(_WAITING) or 0),
        kv_cache_usage=first(_KV_USAGE),
        prefix_cache_queries=first(_PREFIX_QUERIES),
        prefix_cache_hits=first(_PREFIX_HITS),
        ttft_buckets=tuple(sorted(buckets.items())),
        ttft_sum=totals.get(_TTFT + "_sum", 0.0),
    )


class EngineTtft:
    """A collector of the engines' own time to first token, by model, as their /metrics said at
    the last heartbeat or scrape (a histogram can only be copied, not set, through the
    client's Histogram): what a request waited inside the engine, whatever the hops before it."""

    NAME = "llmfleet_agent_engine_time_to_first_token_seconds"

    def __init__(self) -> None:
        self.by_model: dict[str, EngineStats] = {}

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            self.NAME,
            "An engine's time from a request's arrival to its first token (vLLM's histogram), "
            "by model.",
            labels=["model"],
        )
        for model, stats in sorted(self.by_model.items()):
            if stats.ttft_buckets:
                family.add_metric(
                    [model],
                    [(_bound(le), count) for le, count in stats.ttft_buckets],
                    stats.ttft_sum,
                )
        yield family


def _bound(le: float) -> str:
    return "+Inf" if le == float("inf") else repr(le)


class AgentMetrics:
    """The agent's own series, in a registry of its own (several agents may share a process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        # In this order: /metrics lists the series in the order they were registered.
        self._engine_series()
        self._proxy_series()
        self._download_series()
        self._request_series()
        self._kv_cache_series()
        self._standby_series()
        self._compile_cache_series()
        self._adapter_series()
        self._model_series()

    def _engine_series(self) -> None:
        """Engines started, ended and restarted, and how long loads take."""
        self.engine_starts = Counter(
            "llmfleet_agent_engine_starts",
            "Engine starts by engine, outcome, and start: plain, or a standby that became it.",
            ["engine", "outcome", "start"],
            registry=self.registry,
        )
        self.engine_exits = Counter(
            "llmfleet_agent_engine_exits",
            "Engines that ended, by engine and whether it was asked.",
            ["engine", "reason"],
            registry=self.registry,
        )
        self.engine_restarts = Counter(
            "llmfleet_agent_engine_restarts",
            "Engines started again for a model whose engine had failed.",
            ["engine"],
            registry=self.registry,
        )
        self.load_seconds = Histogram(
            "llmfleet_agent_load_duration_seconds",
            "Time from load_model to a serving engine.",
            ["engine", "files_cached"],
            registry=self.registry,
            buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600),
        )

    def _proxy_series(self) -> None:
        """Requests through the inference proxy, and its own failures."""
        self.proxy_requests = Counter(
            "llmfleet_agent_proxy_requests",
            "Inference requests proxied, by status class.",
            ["status"],
            registry=self.registry,
        )
        self.proxy_errors = Counter(
            "llmfleet_agent_proxy_errors",
            "Proxied requests that failed in the agent, by reason.",
            ["reason"],
            registry=self.registry,
        )

    def _download_series(self) -> None:
        """Model downloads into the cache, and what was evicted to make room."""
        self.download_bytes = Counter(
            "llmfleet_agent_download_bytes",
            "Bytes of model files downloaded into the cache.",
            registry=self.registry,
        )
        self.downloads = Counter(
            "llmfleet_agent_downloads",
            "Model downloads by outcome (complete, resumed, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.download_retries = Counter(
            "llmfleet_agent_download_retries",
            "Range reads retried after throttling or failures.",
            registry=self.registry,
        )
        self.download_throughput = Gauge(
            "llmfleet_agent_download_bytes_per_second",
            "Current download throughput, all models.",
            registry=self.registry,
        )
        self.evictions = Counter(
            "llmfleet_agent_cache_evictions",
            "Models deleted from the cache to make room.",
            registry=self.registry,
        )

    def _request_series(self) -> None:
        """Requests the agent holds now: proxied, or waiting for a batch seat."""
        self.requests_in_flight = Gauge(
            "llmfleet_agent_requests_in_flight",
            "Inference requests being proxied now.",
            registry=self.registry,
        )
        self.batch_requests_waiting = Gauge(
            "llmfleet_agent_batch_requests_waiting",
            "Batch-class requests waiting for room on their engine (its reserve kept free).",
            registry=self.registry,
        )

    def _kv_cache_series(self) -> None:
        """What engines' prefix caches hold and report (cache-aware routing's part)."""
        # vLLM's own counters, model by model, as the engines said at the last heartbeat or
        # scrape: what cache-aware routing earns on this host.
        self.prefix_cache_queries = Gauge(
            "llmfleet_agent_engine_prefix_cache_queries",
            "Prompt tokens an engine looked up in its prefix cache since it started, by model.",
            ["model"],
            registry=self.registry,
        )
        self.prefix_cache_hits = Gauge(
            "llmfleet_agent_engine_prefix_cache_hits",
            "Prompt tokens an engine found in its prefix cache since it started, by model.",
            ["model"],
            registry=self.registry,
        )
        self.kv_events_dropped = Counter(
            "llmfleet_agent_kv_events_dropped_total",
            "Engines' KV-cache events the agent could not use, by reason (nodeagent.kvevents).",
            ["reason"],
            registry=self.registry,
        )
        self.engine_ttft = EngineTtft()
        self.registry.register(self.engine_ttft)

    def _standby_series(self) -> None:
        """Standby engines (nodeagent.engines.standby)."""
        self.standby_engines = Gauge(
            "llmfleet_agent_standby_engines",
            "Standby engines by state: ready (imports done, waiting for a model) or starting.",
            ["state"],
            registry=self.registry,
        )
        self.standby_deaths = Counter(
            "llmfleet_agent_standby_deaths",
            "Standby engines that ended or failed to start before a load took them.",
            registry=self.registry,
        )

    def _compile_cache_series(self) -> None:
        """vLLM compile caches (nodeagent.compilecache)."""
        self.compile_caches = Counter(
            "llmfleet_agent_compile_caches",
            "vLLM engine starts by where their compile cache came from: new (none yet), local "
            "(this agent's), store (published by another agent), discarded (deleted, failed).",
            ["origin"],
            registry=self.registry,
        )
        self.compile_cache_publishes = Counter(
            "llmfleet_agent_compile_cache_publishes",
            "Compile caches published to the store after a first start, by outcome.",
            ["outcome"],
            registry=self.registry,
        )

    def _adapter_series(self) -> None:
        """LoRA adapters in engines (nodeagent.adapters)."""
        self.adapter_loads = Counter(
            "llmfleet_agent_adapter_loads",
            "LoRA adapters loaded into engines, by outcome (loaded, failed).",
            ["outcome"],
            registry=self.registry,
        )
        self.adapter_unloads = Counter(
            "llmfleet_agent_adapter_unloads",
            "LoRA adapters unloaded from engines, by reason: lru (room for another), request "
            "(the control plane's keep-alive sweep or an operator).",
            ["reason"],
            registry=self.registry,
        )
        self.adapter_load_seconds = Histogram(
            "llmfleet_agent_adapter_load_duration_seconds",
            "Time from an adapter's first request (or load_adapter) to the engine holding it.",
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
        )

    def _model_series(self) -> None:
        """Models by cache level."""
        self.models = Gauge(
            "llmfleet_agent_models",
            "Models on this agent by cache level.",
            ["cache_level"],
            registry=self.registry,
        )
