"""The control plane's Prometheus metrics, served on /metrics by django-prometheus.

Two kinds. Request metrics are counted by each web process as requests end (each
process is its own scrape target). Fleet metrics are read from the database when
Prometheus scrapes (a few grouped queries): they describe shared state, which a
worker or another web process may have changed, so no process could count them
alone. Labels stay bounded: catalog model ids, agent ids, states, levels, phases;
never request ids or keys.
"""

from __future__ import annotations

import hmac
import logging
import time
from collections import Counter as Tally
from collections.abc import Iterator
from dataclasses import dataclass, field

from django.conf import settings
from django.http import HttpRequest, HttpResponse, JsonResponse
from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
    SummaryMetricFamily,
)
from prometheus_client.registry import Collector

from controlplane import broker

log = logging.getLogger(__name__)

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

REQUESTS = Counter(
    "llmfleet_requests",
    "OpenAI API completion requests answered, by model and HTTP status.",
    ["model", "status"],
)
REQUEST_DURATION = Histogram(
    "llmfleet_request_duration_seconds",
    "Completion requests from arrival to the last byte, by model and warm or cold start.",
    ["model", "start"],
    buckets=_LATENCY_BUCKETS,
)
TIME_TO_FIRST_TOKEN = Histogram(
    "llmfleet_time_to_first_token_seconds",
    "Completion requests from arrival to the first token (the whole answer when not "
    "streamed), by model and warm or cold start.",
    ["model", "start"],
    buckets=_LATENCY_BUCKETS,
)

GATEWAY_IN_FLIGHT = Gauge(
    "llmfleet_gateway_requests_in_flight",
    "Requests this web process has open on a replica, by model and agent.",
    ["model", "agent"],
)
FAILOVERS = Counter(
    "llmfleet_failovers",
    "Requests moved off a replica that could not answer before the first byte, by model and "
    "why (unreachable, draining, not_serving).",
    ["model", "fault"],
)
KV_BLOCKS = Gauge(
    "llmfleet_gateway_kv_blocks",
    "KV blocks a replica's engine holds, as its KV events say (GATEWAY_ROUTING_POLICY=precise), "
    "by model and agent: a series exists while this web process follows that replica.",
    ["model", "agent"],
)
ROUTING_DECISIONS = Counter(
    "llmfleet_routing_decisions",
    "Warm requests routed, by model and why that replica: prefix (it holds, or is the home "
    "of, the request's prompt prefix), load (the least loaded), session (the user's own), "
    "fallback (one holds the prefix but is too much busier than the least loaded).",
    ["model", "reason"],
)
USAGE_DROPPED = Counter(
    "llmfleet_usage_dropped",
    "Batched rows (usage, request figures) dropped because the database was away too long.",
    ["what"],
)
QUEUED = Gauge(
    "llmfleet_gateway_queued_requests",
    "Requests this web process holds because the model's replicas have every seat taken, by "
    "model, API key and admission class.",
    ["model", "key", "priority_class"],
)
QUEUE_WAIT = Histogram(
    "llmfleet_gateway_queue_wait_seconds",
    "How long held requests waited for a seat (those that got one), by model, API key and "
    "admission class.",
    ["model", "key", "priority_class"],
    buckets=_LATENCY_BUCKETS,
)
SHED = Counter(
    "llmfleet_gateway_shed",
    "Requests refused or given up by admission, by model and why (queue_full, key_queue_full, "
    "cold_queue_full, queue_timeout).",
    ["model", "reason"],
)
RATE_LIMIT_UNAVAILABLE = Counter(
    "llmfleet_rate_limit_unavailable",
    "Rate-limit checks or charges skipped because Redis did not answer (requests are let in).",
)

PHASES = ("queue", "download", "engine_start", "first_token")


# Scrapes within this many seconds of one another share one read of the database: several
# Prometheus servers, or one scraping fast, cost the database one read per interval.
FLEET_METRICS_SECONDS = 5.0


class FleetCollector(Collector):
    """Fleet state, read from the database at scrape time (at most every
    FLEET_METRICS_SECONDS)."""

    def __init__(self) -> None:
        self._read: tuple[float, list[Metric]] | None = None

    def describe(self) -> Iterator[Metric]:
        # What registration checks names against: without it, registering would collect,
        # i.e. query the database while apps load.
        gauges = ["llmfleet_agents", "llmfleet_placements", "llmfleet_agent_engine_queue_length",
                  "llmfleet_agent_gpu_memory_free_bytes", "llmfleet_adapter_replicas",
                  "llmfleet_replica_prefix_cache_hit_ratio"]  # fmt: skip
        for name in gauges:
            yield GaugeMetricFamily(name, "")
        counters = ("llmfleet_cold_starts", "llmfleet_loads", "llmfleet_evictions",
                    "llmfleet_agent_contract_rejections",
                    "llmfleet_broker_messages_dropped")  # fmt: skip
        for name in counters:
            yield CounterMetricFamily(name, "")
        yield SummaryMetricFamily("llmfleet_cold_start_phase_seconds", "")

    def collect(self) -> Iterator[Metric]:
        if self._read is not None and time.monotonic() - self._read[0] < FLEET_METRICS_SECONDS:
            yield from self._read[1]
            return
        try:
            families = list(self._collect())
        except Exception:  # the database is away: /metrics still answers, without these
            log.exception("fleet metrics are unavailable")
            return
        self._read = (time.monotonic(), families)
        yield from families

    def _collect(self) -> Iterator[Metric]:
        """Each family in turn, in the page's order: a grouped query or two each from the
        database, and the broker's count of dropped messages."""
        yield _agents_by_state()
        yield _placements_by_level()
        yield _adapter_replicas()
        yield _prefix_cache_hit_ratios()
        yield from _agent_figures()
        steps = _StepTotals.read()
        yield from steps.counters()
        if (dropped := _broker_dropped()) is not None:
            yield dropped
        yield steps.phase_summary()


def _agents_by_state() -> Metric:
    from django.db.models import Count

    from agents.choices import AgentState
    from agents.models import Agent

    agents = GaugeMetricFamily("llmfleet_agents", "Agents by state.", labels=["state"])
    counts = dict(Agent.objects.values_list("state").annotate(n=Count("pk")).values_list(
        "state", "n"))  # fmt: skip
    for state in AgentState.values:
        agents.add_metric([state], counts.get(state, 0))
    return agents


def _placements_by_level() -> Metric:
    from django.db.models import Count

    from agents.models import Placement

    placements = GaugeMetricFamily(
        "llmfleet_placements", "Placements by model and cache level.",
        labels=["model", "cache_level"],
    )  # fmt: skip
    for model_id, level, n in (
        Placement.objects.values_list("model__model_id", "cache_level")
        .annotate(n=Count("pk"))
        .values_list("model__model_id", "cache_level", "n")
    ):
        placements.add_metric([model_id, level], n)
    return placements


def _adapter_replicas() -> Metric:
    from agents.models import Placement

    held = GaugeMetricFamily(
        "llmfleet_adapter_replicas",
        "Engines (READY base replicas) holding each LoRA adapter, as their agents last said.",
        labels=["model"],
    )
    replicas: dict[str, int] = {}
    for adapters in Placement.objects.filter(state="READY", max_loras__gt=0).values_list(
        "adapters", flat=True
    ):
        for adapter_id in adapters or {}:
            replicas[adapter_id] = replicas.get(adapter_id, 0) + 1
    for adapter_id, n in sorted(replicas.items()):
        held.add_metric([adapter_id], n)
    return held


def _prefix_cache_hit_ratios() -> Metric:
    """What cache-aware routing earns, replica by replica (GATEWAY_ROUTING_POLICY)."""
    from agents.models import Placement

    hit_ratio = GaugeMetricFamily(
        "llmfleet_replica_prefix_cache_hit_ratio",
        "Prompt tokens found in a READY replica's prefix cache over those it was asked for "
        "(vLLM's own counters, as its agent's last heartbeat read them).",
        labels=["model", "agent"],
    )
    for model_id, agent_id, ratio in Placement.objects.filter(
        state="READY", kv_cache_hit_rate__isnull=False
    ).values_list("model__model_id", "agent__agent_id", "kv_cache_hit_rate"):
        if ratio is not None:  # (the filter says so; the column's type does not)
            hit_ratio.add_metric([model_id, agent_id], ratio)
    return hit_ratio


def _agent_figures() -> list[Metric]:
    """What each agent last reported: free GPU memory, its engines' queue, and how many of its
    answers were refused as outside the contract (one query for the three)."""
    from agents.models import Agent

    free = GaugeMetricFamily(
        "llmfleet_agent_gpu_memory_free_bytes", "Free GPU memory an agent last reported.",
        labels=["agent"],
    )  # fmt: skip
    queue = GaugeMetricFamily(
        "llmfleet_agent_engine_queue_length",
        "Requests waiting in an agent's engines at its last heartbeat.",
        labels=["agent"],
    )
    rejections = CounterMetricFamily(
        "llmfleet_agent_contract_rejections",
        "Agent answers refused as outside the contract (the reason is on the agent).",
        labels=["agent"],
    )
    for agent_id, memory, waiting, refused in Agent.objects.values_list(
        "agent_id", "gpu_memory_free", "engine_queue_length", "contract_rejections"
    ):
        free.add_metric([agent_id], memory)
        queue.add_metric([agent_id], waiting)
        rejections.add_metric([agent_id], refused)
    return [free, queue, rejections]


@dataclass
class _StepTotals:
    """The finished loads and steps down, summed from their counters (agents.actions.history
    counts them as steps finish): a few dozen rows however long the history, and pruning it
    never makes a counter go down."""

    by_outcome: Tally[str] = field(default_factory=Tally)
    by_level: Tally[str] = field(default_factory=Tally)
    by_step: Tally[tuple[str, str]] = field(default_factory=Tally)
    phase_sum: Tally[str] = field(default_factory=Tally)
    phase_n: Tally[str] = field(default_factory=Tally)

    @classmethod
    def read(cls) -> _StepTotals:
        from agents.choices import LoadEventKind, LoadOutcome
        from agents.models import StepCounter

        totals = cls()
        for row in StepCounter.objects.all():
            if row.kind == LoadEventKind.LOAD:
                totals.by_outcome[row.outcome] += row.count
                if row.outcome == LoadOutcome.SUCCEEDED:
                    totals.by_level[row.from_level] += row.count
                    for phase in PHASES:
                        totals.phase_sum[phase] += getattr(row, f"{phase}_seconds")
                        totals.phase_n[phase] += getattr(row, f"{phase}_n")
            elif row.outcome == LoadOutcome.SUCCEEDED:
                totals.by_step[row.to_level, row.trigger] += row.count
        return totals

    def counters(self) -> list[Metric]:
        """Cold starts by outcome, loads by the level they started from, steps down by the
        level reached and why."""
        from agents.choices import LoadOutcome

        cold = CounterMetricFamily(
            "llmfleet_cold_starts", "Loads onto a GPU by outcome.", labels=["outcome"]
        )
        loads = CounterMetricFamily(
            "llmfleet_loads", "Finished loads onto a GPU by the level they started from.",
            labels=["from_level"],
        )  # fmt: skip
        evictions = CounterMetricFamily(
            "llmfleet_evictions", "Finished steps down the ladder by level reached and why.",
            labels=["to_level", "trigger"],
        )  # fmt: skip
        for outcome in (LoadOutcome.SUCCEEDED, LoadOutcome.FAILED):
            cold.add_metric([outcome.lower()], self.by_outcome[outcome])
        for level, n in sorted(self.by_level.items()):
            loads.add_metric([level], n)
        for (level, trigger), n in sorted(self.by_step.items()):
            evictions.add_metric([level, trigger], n)
        return [cold, loads, evictions]

    def phase_summary(self) -> Metric:
        """A summary without quantiles: rate(_sum) / rate(_count) is the mean of a phase over
        any window."""
        phases = SummaryMetricFamily(
            "llmfleet_cold_start_phase_seconds", "Seconds spent in each phase of loads.",
            labels=["phase"],
        )  # fmt: skip
        for phase in PHASES:
            phases.add_metric([phase], self.phase_n[phase], self.phase_sum[phase])
        return phases


def _broker_dropped() -> Metric | None:
    """Broker messages the workers dropped; None when Redis does not answer (the other
    series are still reported)."""
    if (count := broker.dropped_count()) is None:
        return None
    dropped = CounterMetricFamily(
        "llmfleet_broker_messages_dropped",
        "Broker messages the workers could not decode and dropped (controlplane.broker).",
    )
    dropped.add_metric([], count)
    return dropped


_registered = False


def register_fleet_collector() -> None:
    """Once per process (AppConfig.ready)."""
    global _registered
    if not _registered:
        REGISTRY.register(FleetCollector())
        _registered = True


def _may_scrape(request: HttpRequest) -> bool:
    """A scraper with METRICS_TOKEN (the agent token when unset: what Prometheus scrapes the
    agents with), or a staff user who may view agents. The fleet's agents and models are
    named here: not for everyone who can reach the web port."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    expected = settings.METRICS_TOKEN or settings.AGENT_TOKEN
    presented = token.strip().encode()
    if scheme.lower() == "bearer" and hmac.compare_digest(presented, expected.encode()):
        return True
    user = getattr(request, "user", None)
    return bool(user and user.is_staff and user.has_perm("agents.view_agent"))


def metrics_view(request: HttpRequest) -> HttpResponse:
    """`/metrics`: Prometheus text for a scraper that may read it (`_may_scrape`), else 401."""
    from django_prometheus.exports import ExportToDjangoView

    if not _may_scrape(request):
        response = JsonResponse(
            {"detail": "Scrape with 'Authorization: Bearer <METRICS_TOKEN>' (README: Metrics)."},
            status=401,
        )
        response["WWW-Authenticate"] = 'Bearer realm="llmfleet-metrics"'
        return response
    answer: HttpResponse = ExportToDjangoView(request)
    return answer
