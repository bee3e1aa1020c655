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
