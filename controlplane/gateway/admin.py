"""API keys in the Django admin. A new key's secret is shown once, in the success message."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.forms import ModelForm
from django.http import HttpRequest

from controlplane.gateway import actions
from controlplane.gateway.models import ApiKey, Batch, StoredFile, Usage


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin[ApiKey]):
    list_display = [
        "name", "prefix", "allowed", "requests_per_minute", "tokens_per_minute", "weight",
        "priority_classes", "expires_at", "revoked_at", "last_used_at", "created_at",
    ]  # fmt: skip
    list_filter = [("revoked_at", admin.EmptyFieldListFilter), "expires_at", "priority_classes"]
    search_fields = ["name", "prefix"]
    filter_horizontal = ["allowed_models"]
    readonly_fields = ["prefix", "revoked_at", "created_at", "last_used_at"]
    actions = ["revoke"]

    def get_queryset(self, request: HttpRequest) -> QuerySet[ApiKey]:
        return super().get_queryset(request).prefetch_related("allowed_models")

    @admin.display(description="Models")
    def allowed(self, key: ApiKey) -> str:
        if key.all_models:
            return "every enabled model"
        names = [model.model_id for model in key.allowed_models.all()]
        return ", ".join(names) if names else "none"

    def save_model(
        self, request: HttpRequest, obj: ApiKey, form: ModelForm[ApiKey], change: bool
    ) -> None:
        if not change:
            raw_key = obj.set_new_secret()
            self.message_user(
                request,
                f"The key for {obj.name!r} is {raw_key} — copy it now; it cannot be shown again.",
                messages.WARNING,
            )
        super().save_model(request, obj, form, change)

    @admin.action(description="Revoke the selected keys", permissions=["change"])
    def revoke(self, request: HttpRequest, queryset: QuerySet[ApiKey]) -> None:
        count = actions.revoke_api_keys(queryset.values_list("pk", flat=True))
        self.message_user(request, f"Revoked {count} key(s).", messages.SUCCESS)


@admin.register(Usage)
class UsageAdmin(admin.ModelAdmin[Usage]):
    list_display = ["day", "api_key", "model_id", "requests", "prompt_tokens", "completion_tokens"]
    list_filter = ["day", "model_id"]
    list_select_related = ["api_key"]
    search_fields = ["api_key__name", "model_id"]
    date_hierarchy = "day"
    readonly_fields = [field.name for field in Usage._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # Written by the gateway from the engines' own counts.
        return False


@admin.register(Batch)
class BatchAdmin(admin.ModelAdmin[Batch]):
    """Batches and their progress, read-only: clients create and cancel them (/v1/batches)."""

    list_display = ["batch_id", "api_key", "status", "endpoint", "total", "completed", "failed",
                    "created_at", "expires_at"]  # fmt: skip
    list_filter = ["status", "endpoint"]
    list_select_related = ["api_key"]
    search_fields = ["batch_id", "api_key__name", "input_name"]
    readonly_fields = [field.name for field in Batch._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(StoredFile)
class StoredFileAdmin(admin.ModelAdmin[StoredFile]):
    """Files of /v1/files, read-only: what each key stored, and where."""

    list_display = ["file_id", "api_key", "purpose", "filename", "bytes", "lines", "created_at"]
    list_filter = ["purpose"]
    list_select_related = ["api_key"]
    search_fields = ["file_id", "filename", "api_key__name"]
    readonly_fields = [field.name for field in StoredFile._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # A file goes with its bytes, through the key's own DELETE /v1/files/{id}.
        return False
