"""The fleet's state: agents, the model catalog, placements and load history."""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q

from agents.choices import (
    UNROUTABLE_AGENT_STATES,
    AgentState,
    CacheLevel,
    CompileCache,
    EngineStart,
    LoadEventKind,
    LoadOutcome,
    LoadTrigger,
    ModelKind,
    PlacementState,
)
from agents.scheduling import (
    DEFAULT_MAX_LORAS,
    VLLM_LORA_RANKS,
    lora_flags,
    operator_lora_rank,
)
from agents.validators import (
    mirror_problem,
    validate_agent_id,
    validate_base_url,
    validate_engine_args,
    validate_labels,
    validate_mirrors,
    validate_model_id,
    validate_source,
)
from nodeagent.protocol import SourceSpec


class Agent(models.Model):
    """A GPU host running the node agent (`python -m nodeagent`).

    Rows are created and refreshed by the agent's registration and by
    heartbeats; the GPU and engine figures are the latest it reported.
    """

    agent_id = models.CharField(max_length=128, unique=True, validators=[validate_agent_id])
    base_url = models.CharField(
        max_length=500,
        validators=[validate_base_url],
        help_text="Where the control plane reaches the agent.",
    )
    state = models.CharField(max_length=16, choices=AgentState.choices, default=AgentState.IDLE)
    reported_state = models.CharField(
        max_length=16,
        choices=AgentState.choices,
        default=AgentState.IDLE,
        help_text="What the agent last said of itself; `state` adds health and draining.",
    )
    drained_at = models.DateTimeField(
        null=True, blank=True, help_text="Set while an operator has the agent draining."
    )
    version = models.CharField(max_length=64, blank=True)
    labels = models.JSONField(default=dict, blank=True, validators=[validate_labels])

    gpus = models.JSONField(default=list, blank=True, help_text="Per-GPU facts from NVML.")
    gpu_name = models.CharField(max_length=128, blank=True)
    gpu_count = models.PositiveSmallIntegerField(default=0)
    gpu_memory_total = models.BigIntegerField(default=0, help_text="Bytes, all GPUs.")
    gpu_memory_free = models.BigIntegerField(default=0, help_text="Bytes, all GPUs.")
    gpu_utilization = models.FloatField(null=True, blank=True, help_text="Percent, mean of GPUs.")
    engine_queue_length = models.PositiveIntegerField(default=0)

    last_heartbeat_at = models.DateTimeField(null=True, blank=True)
    heartbeat_failures = models.PositiveIntegerField(default=0)
    contract_version = models.CharField(
        max_length=16, blank=True, help_text="The agent contract's major.minor it last spoke."
    )
    contract_error = models.TextField(
        blank=True, help_text="Why its last answer was refused (outside the contract), if it was."
    )
    contract_error_at = models.DateTimeField(null=True, blank=True)
    contract_rejections = models.PositiveIntegerField(
        default=0, help_text="Answers refused as outside the contract, ever."
    )

    # The agent's own credential (agents.credentials): derived from this nonce, found by its
    # fingerprint; neither is the credential. Empty: not enrolled, or revoked.
    credential_nonce = models.CharField(max_length=64, blank=True, editable=False)
    credential_fingerprint = models.CharField(
        max_length=64, blank=True, editable=False, db_index=True
    )
    credential_issued_at = models.DateTimeField(null=True, blank=True, editable=False)
    # When the agent first spoke with its credential (a registration, or an answered poll):
    # until then its enrolment answer may have been lost, so it may enrol again.
    credential_confirmed_at = models.DateTimeField(null=True, blank=True, editable=False)
    # A rotation under way: the agent keeps the credential of this nonce only once the control
    # plane confirms it is the one it issues (a caller holding the current one cannot rotate
    # the agent to a credential of its own).
    credential_pending_nonce = models.CharField(
        max_length=64, blank=True, editable=False, db_default=""
    )
    # The nonce of a revoked credential, kept until the agent was told to forget it (told again
    # and again while it cannot be reached: a credential that leaked must reach nothing there).
    credential_revoked_nonce = models.CharField(
        max_length=64, blank=True, editable=False, db_default=""
    )
    credential_revoked_at = models.DateTimeField(
        null=True,
        blank=True,
        help_text="Set while the credential is revoked: the agent_id cannot enrol again until "
        "an operator allows it.",
    )
    registered_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["agent_id"]
        indexes = [models.Index(fields=["state"], name="agent_state")]
        permissions = [
            (
                "manage_agent_credentials",
                "Can rotate and revoke agents' credentials and let revoked agents enrol again",
            ),
        ]

    def __str__(self) -> str:
        return self.agent_id

    @property
    def is_routable(self) -> bool:
        return self.state not in UNROUTABLE_AGENT_STATES

    @property
    def credential(self) -> str:
        """What the control plane presents when it calls this agent ("" when not enrolled)."""
        from agents import credentials

        if not self.credential_nonce:
            return ""
        return credentials.derive(self.agent_id, self.credential_nonce)


# What says which checkpoint a model is: on a model that runs its checkpoint's code
# (trust_remote_code), these are that permission's to change, as the flag itself is.
TRUSTED_CHECKPOINT = ("source", "mirrors", "revision", "manifest", "source_labels")


class Model(models.Model):
    """A catalog entry: a checkpoint clients may ask for by `model_id`."""

    model_id = models.CharField(max_length=200, unique=True, validators=[validate_model_id])
    source = models.CharField(
        max_length=1000,
        validators=[validate_source],
        help_text="azure://<container>/<prefix>, s3://<bucket>/<prefix>, gs://<bucket>/<prefix> "
        "or file:///<directory>",
    )
    # Where `source` is (cloud, region, zone): agents whose labels match read from it first.
    # db_default: models the previous release inserts during a rolling upgrade have none.
    source_labels = models.JSONField(
        default=dict,
        db_default={},
        blank=True,
        validators=[validate_labels],
        help_text='Where the source is, e.g. {"cloud": "azure", "region": "westeurope"}.',
    )
    mirrors = models.JSONField(
        default=list,
        db_default=[],
        blank=True,
        validators=[validate_mirrors],
        help_text="More stores holding the same published model (the same manifest), each with "
        'labels: [{"uri": "s3://bucket/prefix", "labels": {"cloud": "aws"}}]. An agent reads '
        "from the source sharing its zone, region or cloud first and falls back to the others.",
    )
    revision = models.CharField(max_length=128, blank=True)
    # What register_model read at every source (nodeagent.store.base.identity): an agent
    # refuses a source holding another manifest. Blank for models cataloged otherwise.
    manifest = models.CharField(
        max_length=64,
        blank=True,
        db_default="",
        help_text="Identity of the published manifest (its files' paths, sizes and sha256), "
        "as register_model read it; agents refuse a source that holds another.",
    )
    size_bytes = models.BigIntegerField(default=0, help_text="Checkpoint size on disk.")
    gpu_memory_bytes = models.BigIntegerField(
        default=0, help_text="GPU memory one replica needs (weights and KV cache)."
    )
    # db_default: models the previous release inserts during a rolling upgrade generate.
    kind = models.CharField(
        max_length=16,
        choices=ModelKind.choices,
        default=ModelKind.GENERATE,
        db_default=ModelKind.GENERATE,
        help_text="Generation models serve chat, completions and responses; embedding models "
        "serve /v1/embeddings (their engines start as vLLM pooling runners).",
    )
    engine_args = models.JSONField(
        default=list,
        blank=True,
        validators=[validate_engine_args],
        help_text='vLLM flags on the allow-list (README: Engine arguments), e.g. ["--dtype", '
        '"float32"].',
    )
    # Its own field, with its own permission, never a flag in engine_args: the checkpoint's
    # Python runs on every agent that loads it (those whose operator allows remote code).
    trust_remote_code = models.BooleanField(
        default=False,
        db_default=False,
        help_text="Let its engines run the checkpoint's own Python code (vLLM's "
        "--trust-remote-code). Needs the 'trust remote code' permission, and agents that allow "
        "it (AGENT_ALLOW_REMOTE_CODE).",
    )
    # A LoRA adapter is a catalog model too: clients ask for it by its own model_id; it is
    # served by its base's engines (nodeagent.adapters), its source holds the adapter's files.
    base = models.ForeignKey(
        "self",
        on_delete=models.PROTECT,
        null=True,
        blank=True,
        related_name="adapters",
        help_text="Set for a LoRA adapter: the model whose engines load it.",
    )
    adapter_rank = models.PositiveSmallIntegerField(
        null=True, blank=True, help_text="A LoRA adapter's rank (`r` of its adapter_config.json)."
    )
    max_loras = models.PositiveSmallIntegerField(
        default=DEFAULT_MAX_LORAS,
        db_default=DEFAULT_MAX_LORAS,
        validators=[MinValueValidator(1)],
        help_text="For a base model with adapters: how many its engines hold at once "
        "(vLLM's --max-loras); the least recently used idle one makes room.",
    )
    keep_alive = models.DurationField(
        default=timedelta(minutes=10), help_text="Idle time before the model steps down a level."
    )
    # db_default too: web processes of the previous release, still running during a rolling
    # upgrade, insert models without this column.
    max_keep_alive = models.DurationField(
        default=timedelta(hours=1),
        db_default=timedelta(hours=1),
        help_text="The longest idle time a request's `keep_alive` may ask for; longer asks get "
        "this.",
    )
    min_replicas = models.PositiveSmallIntegerField(default=0, help_text="0 scales to zero.")
    max_replicas = models.PositiveSmallIntegerField(default=1)
    pinned = models.BooleanField(default=False, help_text="Never evicted from the GPU.")
    enabled = models.BooleanField(default=True, help_text="Listed and served to clients.")
    owned_by = models.CharField(max_length=64, default="llmfleet")
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["model_id"]
        permissions = [
            ("trust_remote_code", "Can let a model run its checkpoint's code (trust_remote_code)"),
        ]
        constraints = [
            models.CheckConstraint(
                condition=Q(max_replicas__gte=1) & Q(max_replicas__gte=models.F("min_replicas")),
                name="model_replicas_in_order",
                violation_error_message="max_replicas must be at least 1 and min_replicas.",
            ),
            models.CheckConstraint(
                condition=Q(size_bytes__gte=0) & Q(gpu_memory_bytes__gte=0),
                name="model_sizes_not_negative",
            ),
        ]

    def __str__(self) -> str:
        return self.model_id

    @property
    def is_adapter(self) -> bool:
        return self.base_id is not None

    @property
    def sources(self) -> tuple[SourceSpec, ...]:
        """Every place the model is published: `source` first, then its mirrors."""
        mirrors = [
            SourceSpec(mirror["uri"], dict(mirror.get("labels") or {}))
            for mirror in self.mirrors or ()
        ]
        return (SourceSpec(self.source, dict(self.source_labels or {})), *mirrors)

    def clean(self) -> None:
        """A mirror is another place than the source, and adapters have none. An adapter's
        base is a generation model of the catalog that is no adapter itself, and its rank
        fits what the base's engines take."""
        super().clean()
        problem = mirror_problem(self.source, self.mirrors, adapter=self.base_id is not None)
        if problem:
            raise ValidationError({"mirrors": problem})
        if self.base_id is None:
            if self.adapter_rank is not None:
                raise ValidationError(
                    {"adapter_rank": "Only a LoRA adapter (with a base) has a rank."}
                )
            allowed = operator_lora_rank(self.engine_args)
            if allowed is not None and self.pk is not None:
                ranks = self.adapters.values_list("adapter_rank", flat=True)
                widest = max((rank for rank in ranks if rank), default=0)
                if widest > allowed:
                    raise ValidationError(
                        {"engine_args": f"--max-lora-rank {allowed} is below the rank {widest} "
                                        "of one of its adapters."}
                    )  # fmt: skip
            return
        base = self.base
        assert base is not None
        errors: dict[str, str] = {}
        if base.pk == self.pk:
            errors["base"] = "A model cannot be an adapter of itself."
        elif base.base_id is not None:
            errors["base"] = f"{base.model_id} is an adapter itself; an adapter's base is a model."
        elif base.kind != ModelKind.GENERATE:
            errors["base"] = (
                f"{base.model_id} is an {base.kind} model; adapters are for generation models."
            )
        if self.kind != ModelKind.GENERATE:
            errors["kind"] = "A LoRA adapter serves generation (chat, completions, responses)."
        if self.min_replicas:
            errors["min_replicas"] = (
                "A LoRA adapter has no replicas of its own: set min_replicas on its base."
            )
        if self.pk is not None and self.adapters.exists():
            errors["base"] = f"{self.model_id} has adapters of its own, so it cannot be one."
        rank = self.adapter_rank
        if rank is None:
            errors["adapter_rank"] = "A LoRA adapter needs its rank."
        else:
            allowed = operator_lora_rank(base.engine_args) or VLLM_LORA_RANKS[-1]
            if rank > allowed:
                errors["adapter_rank"] = (
                    f"Rank {rank} exceeds the {allowed} that {base.model_id}'s engines take "
                    "(--max-lora-rank)."
                )
        if errors:
            raise ValidationError(errors)

    @property
    def lora_argv(self) -> tuple[str, ...]:
        """The LoRA flags its engines start with: none unless enabled adapters are catalogued
        for it (agents.scheduling.lora_flags)."""
        ranks = [
            rank
            for rank in self.adapters.filter(enabled=True).values_list("adapter_rank", flat=True)
            if rank
        ]
        return lora_flags(self.engine_args, ranks, self.max_loras)

    @property
    def engine_argv(self) -> tuple[str, ...]:
        """What its engines start with: the flags its kind needs, then the operator's.

        An embedding model is a vLLM pooling runner; vLLM then converts a `*ForCausalLM`
        checkpoint to embeddings itself (`--convert auto`). An operator's own `--runner`
        wins.
        """
        args = tuple(self.engine_args)
        if self.kind == ModelKind.EMBEDDING and not any(
            arg == "--runner" or arg.startswith("--runner=") for arg in args
        ):
            return ("--runner", "pooling", *args)
        return args


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
