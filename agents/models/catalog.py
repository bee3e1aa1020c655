"""The model catalog: the checkpoints (and LoRA adapters) clients may ask for by id."""

from __future__ import annotations

from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Q

from agents.choices import ModelKind
from agents.scheduling import (
    DEFAULT_MAX_LORAS,
    VLLM_LORA_RANKS,
    lora_flags,
    operator_lora_rank,
)
from agents.validators import (
    mirror_problem,
    validate_engine_args,
    validate_labels,
    validate_mirrors,
    validate_model_id,
    validate_source,
)
from nodeagent.protocol import SourceSpec

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
