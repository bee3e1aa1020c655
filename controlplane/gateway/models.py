"""API keys of the OpenAI-compatible gateway."""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime

from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import Exists, OuterRef, QuerySet
from django.utils import timezone

from agents.models import Model

KEY_PREFIX = "llmf-"
# Shown in the admin to tell keys apart: the fixed prefix plus a few random characters.
DISPLAY_PREFIX_LENGTH = len(KEY_PREFIX) + 6


def hash_key(raw_key: str) -> str:
    """The stored form of a key. Keys carry 256 random bits, so a fast hash is safe here."""
    return hashlib.sha256(raw_key.encode()).hexdigest()


def new_raw_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


class ApiKeyQuerySet(models.QuerySet["ApiKey"]):
    def for_secret(self, raw_key: str) -> ApiKeyQuerySet:
        """The key with this secret, if any (one indexed lookup by hash)."""
        return self.filter(key_hash=hash_key(raw_key))


class PriorityClasses(models.TextChoices):
    """The admission classes a key's requests may ask for (`priority_class`, or the
    `X-Priority-Class` header); the first is what a request gets without asking."""

    ANY = "interactive,batch", "interactive, or batch when asked"
    INTERACTIVE = "interactive", "interactive only"
    BATCH = "batch", "batch only"


class ApiKey(models.Model):
    """A client's credential for `/v1/*`. Only a hash of the key is stored."""

    name = models.CharField(max_length=100)
    prefix = models.CharField(max_length=DISPLAY_PREFIX_LENGTH, editable=False)
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    allowed_models = models.ManyToManyField(
        Model,
        blank=True,
        related_name="api_keys",
        help_text="Models this key may use (unless it may use every model).",
    )
    # Explicit, never the absence of rows: deleting the last model a key was limited to must
    # leave it with no model, not widen it to every model.
    all_models = models.BooleanField(
        default=False, help_text="Every enabled model, now and later; the list above is ignored."
    )
    requests_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: no limit."
    )
    tokens_per_minute = models.PositiveIntegerField(
        null=True, blank=True, help_text="Empty: no limit."
    )
    weight = models.PositiveSmallIntegerField(
        default=1,
        db_default=1,
        validators=[MinValueValidator(1)],
        help_text="Its share of a model's seats while requests wait for one: a key of weight "
        "2 is served twice the tokens of a key of weight 1.",
    )
    priority_classes = models.CharField(
        max_length=20,
        choices=PriorityClasses.choices,
        default=PriorityClasses.ANY,
        db_default=PriorityClasses.ANY,
        help_text="Batch requests wait while any interactive request does.",
    )
    expires_at = models.DateTimeField(null=True, blank=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    objects = ApiKeyQuerySet.as_manager()
    # Filled by the gateway's cache: the pks of allowed models.
    allowed_ids: set[int]

    class Meta:
        ordering = ["name", "id"]
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"

    def set_new_secret(self) -> str:
        """Give the key a fresh secret and return it: the only time it exists in clear."""
        raw_key = new_raw_key()
        self.key_hash = hash_key(raw_key)
        self.prefix = raw_key[:DISPLAY_PREFIX_LENGTH]
        return raw_key

    def usable_models(self) -> QuerySet[Model]:
        """Enabled catalog models this key may use: all of them, or its allow-list."""
        enabled = Model.objects.filter(enabled=True)
        if self.all_models:
            return enabled
        grants = ApiKey.allowed_models.through.objects.filter(apikey_id=self.pk)
        return enabled.filter(Exists(grants.filter(model_id=OuterRef("pk"))))

    def may_use(self, model: Model) -> bool:
        """Whether the key may use the model; needs `allowed_ids` (the gateway's cache fills it)."""
        return self.all_models or model.pk in self.allowed_ids

    def admission_class(self, asked: str | None) -> str | None:
        """The class a request of this key is admitted in, given what it asked for; None when
        the key may not use that class."""
        allowed = self.priority_classes.split(",")
        if asked is None:
            return allowed[0]
        return asked if asked in allowed else None

    def inactive_reason(self, now: datetime | None = None) -> str | None:
        """Why the key may not be used now ("revoked", "expired"), or None if it may."""
        now = now or timezone.now()
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= now:
            return "expired"
        return None


class Usage(models.Model):
    """Tokens a key spent on a model in a day, as the engines reported them.

    It names the model (the `model` clients sent) rather than pointing at its catalog row:
    billing history outlives a model taken out of the catalog."""

    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="usage")
    model_id = models.CharField(max_length=200, verbose_name="model")
    day = models.DateField()
    requests = models.PositiveBigIntegerField(default=0)
    prompt_tokens = models.PositiveBigIntegerField(default=0)
    completion_tokens = models.PositiveBigIntegerField(default=0)

    class Meta:
        ordering = ["-day", "api_key", "model_id"]
        verbose_name_plural = "usage"
        constraints = [
            models.UniqueConstraint(
                fields=["api_key", "model_id", "day"], name="usage_one_row_per_key_model_day"
            )
        ]

    def __str__(self) -> str:
        return f"{self.api_key.name} / {self.model_id} on {self.day}"


class RequestMinute(models.Model):
    """Requests to one model in one minute, summed over every web process: what the
    dashboard's per-model panel shows for the last minutes (Prometheus has the rest)."""

    model = models.ForeignKey(Model, on_delete=models.CASCADE, related_name="request_minutes")
    minute = models.DateTimeField(help_text="The minute's start, UTC.")
    requests = models.PositiveIntegerField(default=0)
    errors = models.PositiveIntegerField(default=0, help_text="Answers of status 500 and up.")
    warm_ttft_seconds = models.FloatField(default=0, help_text="Sum over warm requests.")
    warm_requests = models.PositiveIntegerField(default=0)
    cold_ttft_seconds = models.FloatField(default=0, help_text="Sum over cold requests.")
    cold_requests = models.PositiveIntegerField(default=0)
    queued = models.PositiveIntegerField(
        default=0, db_default=0, help_text="Requests that waited for a seat (admission)."
    )
    shed = models.PositiveIntegerField(
        default=0, db_default=0, help_text="Requests admission refused or gave up (queue full, "
        "past their deadline).",
    )  # fmt: skip

    class Meta:
        ordering = ["-minute", "model"]
        constraints = [
            models.UniqueConstraint(fields=["model", "minute"], name="request_minute_one_row")
        ]
        indexes = [models.Index(fields=["-minute"], name="request_minute_newest")]

    def __str__(self) -> str:
        return f"{self.model.model_id} at {self.minute:%H:%M}"


class FilePurpose(models.TextChoices):
    """What a file of /v1/files is for (OpenAI's names). Clients upload `batch` input; the
    gateway writes `batch_output` (a batch's output and error files)."""

    BATCH = "batch", "batch input"
    BATCH_OUTPUT = "batch_output", "batch output"


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class StoredFile(models.Model):
    """A file of `/v1/files`, owned by the API key that uploaded it. Its bytes are in the
    files store (controlplane.gateway.filestore) under its id; the row is written after them
    and removed before them, so a row always has its bytes."""

    file_id = models.CharField(max_length=40, unique=True, default=new_file_id, editable=False)
    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="files")
    filename = models.CharField(max_length=255)
    purpose = models.CharField(max_length=20, choices=FilePurpose.choices)
    bytes = models.PositiveBigIntegerField()
    lines = models.PositiveIntegerField(default=0, help_text="Requests in a batch input file.")
    location = models.CharField(max_length=1000, help_text="The store it was written to.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "file"
        indexes = [models.Index(fields=["api_key", "-created_at"], name="file_key_newest")]

    def __str__(self) -> str:
        return f"{self.file_id} ({self.filename})"

    def as_openai(self) -> dict[str, object]:
        """The file object of OpenAI's API."""
        return {
            "id": self.file_id, "object": "file", "bytes": self.bytes,
            "created_at": int(self.created_at.timestamp()), "expires_at": None,
            "filename": self.filename, "purpose": self.purpose, "status": "processed",
            "status_details": None,
        }  # fmt: skip


class BatchStatus(models.TextChoices):
    """A batch's states, as OpenAI's Batch API names them."""

    VALIDATING = "validating"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    FAILED = "failed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"


# The states a batch's runner still has work in (what resuming a batch picks up).
BATCH_RUNNING_STATES = (
    BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING,
    BatchStatus.CANCELLING,
)  # fmt: skip


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


class Batch(models.Model):
    """A batch of `/v1/batches`: its input file's lines, run by the `batches` worker through
    the gateway's own path (routing, admission in the batch class, usage), each line's
    outcome journalled (`BatchOutcome`) before the output and error files are written."""

    batch_id = models.CharField(max_length=40, unique=True, default=new_batch_id, editable=False)
    api_key = models.ForeignKey(ApiKey, on_delete=models.CASCADE, related_name="batches")
    input_file = models.ForeignKey(
        StoredFile, on_delete=models.SET_NULL, null=True, related_name="batches"
    )
    # The input file's id, kept when the file is deleted (OpenAI's batch still names it).
    input_name = models.CharField(max_length=40, verbose_name="input file")
    endpoint = models.CharField(max_length=40)
    completion_window = models.CharField(max_length=8, default="24h")
    metadata = models.JSONField(null=True, blank=True)
    status = models.CharField(
        max_length=12, choices=BatchStatus.choices, default=BatchStatus.VALIDATING
    )
    errors = models.JSONField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    output_file = models.ForeignKey(
        StoredFile, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    error_file = models.ForeignKey(
        StoredFile, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    created_at = models.DateTimeField(auto_now_add=True)
    expires_at = models.DateTimeField()
    in_progress_at = models.DateTimeField(null=True, blank=True)
    finalizing_at = models.DateTimeField(null=True, blank=True)
    completed_at = models.DateTimeField(null=True, blank=True)
    failed_at = models.DateTimeField(null=True, blank=True)
    expired_at = models.DateTimeField(null=True, blank=True)
    cancelling_at = models.DateTimeField(null=True, blank=True)
    cancelled_at = models.DateTimeField(null=True, blank=True)
    # Which runner holds the batch, until when: a runner that dies (a worker killed) stops
    # renewing it, and the batch is resumed by another once it lapses.
    runner = models.CharField(max_length=64, blank=True)
    lease_until = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name_plural = "batches"
        indexes = [
            models.Index(fields=["api_key", "-created_at"], name="batch_key_newest"),
            models.Index(fields=["status", "lease_until"], name="batch_status_lease"),
        ]

    def __str__(self) -> str:
        return f"{self.batch_id} ({self.status})"

    def as_openai(self) -> dict[str, object]:
        """The batch object of OpenAI's API."""

        def at(moment: datetime | None) -> int | None:
            return int(moment.timestamp()) if moment is not None else None

        return {
            "id": self.batch_id, "object": "batch", "endpoint": self.endpoint,
            "errors": self.errors, "input_file_id": self.input_name,
            "completion_window": self.completion_window, "status": self.status,
            "output_file_id": self.output_file.file_id if self.output_file else None,
            "error_file_id": self.error_file.file_id if self.error_file else None,
            "created_at": at(self.created_at), "in_progress_at": at(self.in_progress_at),
            "expires_at": at(self.expires_at), "finalizing_at": at(self.finalizing_at),
            "completed_at": at(self.completed_at), "failed_at": at(self.failed_at),
            "expired_at": at(self.expired_at), "cancelling_at": at(self.cancelling_at),
            "cancelled_at": at(self.cancelled_at),
            "request_counts": {"total": self.total, "completed": self.completed,
                               "failed": self.failed},
            "metadata": self.metadata,
        }  # fmt: skip


class BatchOutcome(models.Model):
    """One line's outcome, journalled by `custom_id` as its answer comes: a line journalled is
    never sent again, and the output and error files are written from the journal."""

    batch = models.ForeignKey(Batch, on_delete=models.CASCADE, related_name="outcomes")
    custom_id = models.CharField(max_length=512)
    line = models.PositiveIntegerField()
    status_code = models.PositiveSmallIntegerField(help_text="0: it never ran (expired).")
    body = models.JSONField(null=True)
    error = models.JSONField(null=True)
    request_id = models.CharField(max_length=64, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["batch", "line"]
        constraints = [
            models.UniqueConstraint(fields=["batch", "custom_id"], name="batch_outcome_once")
        ]

    def __str__(self) -> str:
        return f"{self.batch.batch_id} / {self.custom_id}"

    @property
    def succeeded(self) -> bool:
        return 200 <= self.status_code < 300
