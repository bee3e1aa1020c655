"""What loads showed: each load and unload (LoadEvent), the counters /metrics reports
(StepCounter), and each agent's running estimates (LoadEstimate)."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from agents.choices import (
    CacheLevel,
    CompileCache,
    EngineStart,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
)
from agents.models.agent import Agent
from agents.models.catalog import Model
from agents.models.placement import Placement


class LoadEvent(models.Model):
    """One load or unload of a placement, with its outcome and per-phase timings.

    The history the scheduler learns bandwidth and engine start times from,
    and the dashboard's timeline of cold starts.
    """

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="load_events")
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="load_events")
    placement = models.ForeignKey(
        Placement, on_delete=models.SET_NULL, null=True, blank=True, related_name="load_events"
    )
    kind = models.CharField(max_length=8, choices=LoadEventKind.choices)
    trigger = models.CharField(max_length=16, choices=LoadTrigger.choices)
    outcome = models.CharField(
        max_length=16, choices=LoadOutcome.choices, default=LoadOutcome.PENDING
    )
    from_level = models.CharField(max_length=16, choices=CacheLevel.choices)
    to_level = models.CharField(max_length=16, choices=CacheLevel.choices)
    queued_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    queue_seconds = models.FloatField(null=True, blank=True)
    download_seconds = models.FloatField(null=True, blank=True)
    engine_start_seconds = models.FloatField(null=True, blank=True)
    # How the engine started: "standby" (a process with vLLM imported became it) or "plain";
    # for a plain start the agent's reason (no standby ready, arguments it cannot take).
    engine_start = models.CharField(max_length=8, choices=EngineStart.choices, blank=True)
    engine_start_note = models.CharField(max_length=1000, blank=True)
    # Where the engine's compile cache came from (nodeagent.compilecache): "new" (it
    # compiled), "local", "store" (another agent's), "discarded"; blank without one.
    compile_cache = models.CharField(max_length=10, choices=CompileCache.choices, blank=True)
    first_token_seconds = models.FloatField(null=True, blank=True)
    bytes_downloaded = models.BigIntegerField(null=True, blank=True)
    # Which of the model's sources the files came from (blank: an agent of contract < 1.4).
    source = models.CharField(max_length=1000, blank=True, db_default="")
    error = models.TextField(blank=True)
    # A load's trace (OpenTelemetry; blank while tracing is off): chosen as it is queued, so
    # the requests that wait on it link to it and its phases are recorded under it as it ends.
    compile_cache_seconds = models.FloatField(null=True, blank=True)
    # The sources a download gave up on before `source` served it, one "uri: why" per line.
    failed_sources = models.TextField(blank=True, db_default="")
    trace_id = models.CharField(max_length=32, blank=True, db_default="")
    span_id = models.CharField(max_length=16, blank=True, db_default="")

    class Meta:
        ordering = ["-queued_at", "-id"]
        indexes = [
            models.Index(fields=["-queued_at"], name="loadevent_newest"),
            models.Index(fields=["agent", "kind", "outcome"], name="loadevent_agent_history"),
            # The sweep and the dashboard read the steps under way: a handful, however long
            # the history grows.
            models.Index(
                fields=["queued_at"],
                condition=Q(outcome=LoadOutcome.PENDING),
                name="loadevent_pending",
            ),
            # A cold start's one look at the history: the model's recent failed loads.
            models.Index(
                fields=["model", "-finished_at"],
                condition=Q(kind=LoadEventKind.LOAD, outcome=LoadOutcome.FAILED),
                name="loadevent_recent_failures",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.model.model_id} on {self.agent.agent_id}: {self.outcome}"

    @property
    def total_seconds(self) -> float | None:
        if self.finished_at is None:
            return None
        return (self.finished_at - self.queued_at).total_seconds()


class StepCounter(models.Model):
    """Finished loads and unloads, counted as they finish: what /metrics reports as counters.

    Kept apart from LoadEvent so that pruning the history (RETENTION_LOAD_EVENTS_DAYS) never
    makes a counter go down, and a scrape reads a few dozen rows, not the history.
    """

    kind = models.CharField(max_length=8, choices=LoadEventKind.choices)
    outcome = models.CharField(max_length=16, choices=LoadOutcome.choices)
    trigger = models.CharField(max_length=16, choices=LoadTrigger.choices)
    from_level = models.CharField(max_length=16, choices=CacheLevel.choices)
    to_level = models.CharField(max_length=16, choices=CacheLevel.choices)
    count = models.BigIntegerField(default=0)
    # Sums and counts of each phase's seconds over these steps (the cold-start summary).
    queue_seconds = models.FloatField(default=0)
    queue_n = models.BigIntegerField(default=0)
    download_seconds = models.FloatField(default=0)
    download_n = models.BigIntegerField(default=0)
    engine_start_seconds = models.FloatField(default=0)
    engine_start_n = models.BigIntegerField(default=0)
    first_token_seconds = models.FloatField(default=0)
    first_token_n = models.BigIntegerField(default=0)

    class Meta:
        constraints = [
            models.UniqueConstraint(
                fields=["kind", "outcome", "trigger", "from_level", "to_level"],
                name="step_counter_one_row",
            )
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.outcome} {self.from_level}->{self.to_level}: {self.count}"


class LoadEstimate(models.Model):
    """What an agent's loads showed, as running estimates (scheduling.observe): a cold start's
    decision reads one row per agent, never the load history. Its own row, apart from the
    agent's, so a finishing load never waits on a heartbeat round's lock of the agent."""

    agent = models.OneToOneField(
        Agent, on_delete=models.CASCADE, primary_key=True, related_name="estimate"
    )
    bytes_per_second = models.FloatField(null=True, blank=True)
    # The same estimate per store (protocol.source_store: `s3://bucket`): a host reads its
    # region's mirror faster than another cloud's store, and a cold start's estimate is of
    # the store it will read from.
    source_bytes_per_second = models.JSONField(default=dict, db_default={}, blank=True)
    engine_start_seconds = models.FloatField(
        null=True, blank=True, help_text="Engine start from local disk."
    )
    wake_seconds = models.FloatField(null=True, blank=True, help_text="Wake from host RAM.")

    def __str__(self) -> str:
        return f"estimates of {self.agent_id}"
