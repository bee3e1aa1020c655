"""Placements: one model on one agent, at some level of the cache ladder."""

from __future__ import annotations

from django.db import models
from django.db.models import Q

from agents.choices import UNROUTABLE_AGENT_STATES, CacheLevel, PlacementState
from agents.models.agent import Agent
from agents.models.catalog import Model
from agents.validators import validate_base_url


class PlacementQuerySet(models.QuerySet["Placement"]):
    def ready_for_any(self) -> PlacementQuerySet:
        """READY placements on agents that take new work."""
        return self.filter(state=PlacementState.READY).exclude(
            agent__state__in=UNROUTABLE_AGENT_STATES
        )

    def ready_for(self, model: Model) -> PlacementQuerySet:
        """READY placements of `model` on agents that take new work: what routing picks from."""
        return self.ready_for_any().filter(model=model).select_related("agent")


class Placement(models.Model):
    """One model on one agent, at some level of the cache ladder."""

    agent = models.ForeignKey(Agent, on_delete=models.CASCADE, related_name="placements")
    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="placements")
    state = models.CharField(
        max_length=16, choices=PlacementState.choices, default=PlacementState.DOWNLOADING
    )
    cache_level = models.CharField(
        max_length=16, choices=CacheLevel.choices, default=CacheLevel.NONE
    )
    inference_endpoint_url = models.CharField(
        max_length=500, blank=True, validators=[validate_base_url]
    )
    bytes_done = models.BigIntegerField(default=0)
    bytes_total = models.BigIntegerField(default=0)
    kv_cache_hit_rate = models.FloatField(null=True, blank=True)
    kv_cache_usage = models.FloatField(null=True, blank=True)
    requests_in_flight = models.PositiveIntegerField(default=0)
    requests_waiting = models.PositiveIntegerField(default=0)
    last_used_at = models.DateTimeField(null=True, blank=True)
    # The idle time the last request that said `keep_alive` asked of this replica (at most the
    # model's max_keep_alive); empty: the model's keep_alive.
    keep_alive = models.DurationField(null=True, blank=True)
    ready_at = models.DateTimeField(null=True, blank=True)
    # LoRA: what its engine holds, as its agent last said (heartbeats; the gateway adds one it
    # saw load): adapter model_id → requests_total, requests_in_flight, loaded_at and
    # last_used_at (epoch seconds). max_loras 0: its engine runs without LoRA.
    adapters = models.JSONField(default=dict, db_default={}, blank=True)
    max_loras = models.PositiveSmallIntegerField(default=0, db_default=0)
    max_lora_rank = models.PositiveSmallIntegerField(default=0, db_default=0)
    # How many requests its engine runs at once, as its agent said (0: unknown): the seats the
    # gateway gives it (controlplane.gateway.admission).
    max_num_seqs = models.PositiveIntegerField(default=0, db_default=0)
    # What a pending load does now, in words (the agent's report): "downloading",
    # "verifying", "starting the engine (standby)"; "" once it ended.
    phase = models.CharField(max_length=200, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    objects = PlacementQuerySet.as_manager()

    class Meta:
        ordering = ["model__model_id", "agent__agent_id"]
        constraints = [
            models.UniqueConstraint(
                fields=["agent", "model"], name="placement_one_per_agent_model"
            ),
        ]
        indexes = [
            # Routing's lookup: the READY replicas of one model. Partial, so it stays as
            # small as the number of warm replicas however many placements pile up.
            models.Index(
                fields=["model"], condition=Q(state=PlacementState.READY), name="placement_ready"
            ),
            models.Index(fields=["state", "cache_level"], name="placement_state_level"),
        ]

    def __str__(self) -> str:
        return f"{self.model.model_id} on {self.agent.agent_id}"

    @property
    def progress(self) -> float | None:
        """Download progress from 0 to 1, or None while the size is unknown."""
        if not self.bytes_total:
            return None
        return min(self.bytes_done / self.bytes_total, 1.0)
