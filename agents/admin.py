"""The operator's view of the fleet in the Django admin."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import Count, Q, QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.utils import timezone
from django.utils.html import format_html
from django.utils.safestring import SafeString

from agents import actions
from agents.choices import UNROUTABLE_AGENT_STATES, AgentState, CacheLevel, PlacementState
from agents.models import TRUSTED_CHECKPOINT, Agent, LoadEvent, Model, Placement

_STATE_COLOURS = {
    AgentState.IDLE: "#2e7d32",
    AgentState.INFERRING: "#1565c0",
    AgentState.LOADING_MODEL: "#6a1b9a",
    AgentState.DRAINING: "#ef6c00",
    AgentState.DEGRADED: "#c62828",
    AgentState.OFFLINE: "#616161",
}


def format_bytes(value: int | None) -> str:
    if not value:
        return "-"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def format_age(moment: datetime | None) -> str:
    if moment is None:
        return "never"
    seconds = max((timezone.now() - moment).total_seconds(), 0)
    if seconds < 120:
        return f"{seconds:.0f} s ago"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min ago"
    return f"{timedelta(seconds=int(seconds))} ago"


class ReadOnlyInline(admin.TabularInline):  # type: ignore[type-arg]
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


class AgentPlacementInline(ReadOnlyInline):
    model = Placement
    fields = readonly_fields = (
        "model",
        "state",
        "cache_level",
        "requests_in_flight",
        "last_used_at",
        "error",
    )


@admin.register(Agent)
class AgentAdmin(admin.ModelAdmin[Agent]):
    list_display = [
        "agent_id", "state_badge", "gpu", "gpu_memory", "heartbeat",
        "placement_count", "engine_queue_length", "version",
    ]  # fmt: skip
    list_filter = ["state", "gpu_name"]
    search_fields = ["agent_id", "base_url"]
    actions = ["drain", "undrain", "rotate_credential", "revoke_credential", "allow_enrolment"]
    inlines = [AgentPlacementInline]
    readonly_fields = [
        "agent_id", "base_url", "state", "reported_state", "drained_at", "version", "labels",
        "gpus", "gpu_name", "gpu_count", "gpu_memory_total", "gpu_memory_free",
        "gpu_utilization", "engine_queue_length", "last_heartbeat_at", "heartbeat_failures",
        "contract_version", "contract_error", "contract_error_at", "contract_rejections",
        "credential", "credential_issued_at", "credential_revoked_at", "registered_at",
        "updated_at",
    ]  # fmt: skip

    def get_queryset(self, request: HttpRequest) -> QuerySet[Agent]:
        return super().get_queryset(request).annotate(placement_total=Count("placements"))

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Agents enter the fleet by enrolling themselves with the enrolment token.
        return False

    @admin.display(description="State", ordering="state")
    def state_badge(self, agent: Agent) -> SafeString:
        colour = _STATE_COLOURS.get(AgentState(agent.state), "#000")
        return format_html('<b style="color:{}">{}</b>', colour, agent.get_state_display())

    @admin.display(description="GPUs", ordering="gpu_name")
    def gpu(self, agent: Agent) -> str:
        return f"{agent.gpu_count} x {agent.gpu_name}" if agent.gpu_count else "no GPU"

    @admin.display(description="GPU memory free", ordering="gpu_memory_free")
    def gpu_memory(self, agent: Agent) -> str:
        if not agent.gpu_memory_total:
            return "-"
        return f"{format_bytes(agent.gpu_memory_free)} of {format_bytes(agent.gpu_memory_total)}"

    @admin.display(description="Last heartbeat", ordering="last_heartbeat_at")
    def heartbeat(self, agent: Agent) -> str | SafeString:
        age = format_age(agent.last_heartbeat_at)
        if not agent.contract_error:
            return age
        # A refused answer is why an agent that is plainly up turns DEGRADED: say so here.
        return format_html('{} <span style="color:#b00" title="{}">(answer refused)</span>',
                           age, agent.contract_error)  # fmt: skip

    @admin.display(description="Placements", ordering="placement_total")
    def placement_count(self, agent: Agent) -> int:
        return int(getattr(agent, "placement_total", 0))

    def has_manage_credentials_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("agents.manage_agent_credentials")

    @admin.action(
        description="Drain: send no new work to the selected agents", permissions=["change"]
    )
    def drain(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        count = _for_each_agent(queryset, actions.drain_agent)
        self.message_user(request, f"Draining {count} agent(s).", messages.SUCCESS)

    @admin.action(
        description="Undrain: let the selected agents take new work", permissions=["change"]
    )
    def undrain(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        count = _for_each_agent(queryset, actions.undrain_agent)
        self.message_user(request, f"{count} agent(s) take new work again.", messages.SUCCESS)

    @admin.display(description="Credential")
    def credential(self, agent: Agent) -> str:
        # The fingerprint's start, as `ssh-keygen -l` shows keys: enough to tell two apart.
        if agent.credential_fingerprint:
            return f"sha256:{agent.credential_fingerprint[:12]}…"
        return "revoked" if agent.credential_revoked_at else "not enrolled"

    @admin.action(
        description="Rotate the selected agents' credentials", permissions=["manage_credentials"]
    )
    def rotate_credential(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        for agent_id in queryset.values_list("agent_id", flat=True):
            try:
                actions.rotate_agent_credential(agent_id)
            except actions.CredentialError as exc:
                self.message_user(request, str(exc), messages.ERROR)
            else:
                self.message_user(request, f"{agent_id}: credential rotated.", messages.SUCCESS)

    @admin.action(
        description="Revoke the selected agents' credentials (they go OFFLINE)",
        permissions=["manage_credentials"],
    )
    def revoke_credential(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        count = _for_each_agent(queryset, actions.revoke_agent_credential)
        self.message_user(request, f"Revoked {count} credential(s).", messages.WARNING)

    @admin.action(
        description="Allow the selected revoked agents to enrol again",
        permissions=["manage_credentials"],
    )
    def allow_enrolment(self, request: HttpRequest, queryset: QuerySet[Agent]) -> None:
        count = _for_each_agent(queryset, actions.allow_enrolment)
        self.message_user(request, f"{count} agent(s) may enrol again.", messages.SUCCESS)


def _for_each_agent(queryset: QuerySet[Agent], act: Callable[[str], object]) -> int:
    """Run an action on each selected agent (by agent_id, each with its own row lock)."""
    agent_ids = list(queryset.values_list("agent_id", flat=True))
    for agent_id in agent_ids:
        act(agent_id)
    return len(agent_ids)


class ModelPlacementInline(ReadOnlyInline):
    model = Placement
    fields = readonly_fields = (
        "agent",
        "state",
        "cache_level",
        "requests_in_flight",
        "last_used_at",
        "error",
    )


class LoadOntoAgentForm(forms.Form):
    agent = forms.ModelChoiceField(
        queryset=Agent.objects.exclude(state__in=UNROUTABLE_AGENT_STATES),
        help_text="Agents that take new work. Idle models there step down if GPU memory is short.",
    )


@admin.register(Model)
class CatalogModelAdmin(admin.ModelAdmin[Model]):
    list_display = [
        "model_id", "kind", "base", "enabled", "pinned", "ready_replicas", "size", "gpu_memory",
        "keep_alive", "min_replicas", "max_replicas", "source",
    ]  # fmt: skip
    list_filter = ["kind", "enabled", "pinned", ("base", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["base"]
    search_fields = ["model_id", "source"]
    readonly_fields = ["created_at", "updated_at"]
    inlines = [ModelPlacementInline]
    actions = ["load_where_soonest", "load_onto_agent"]

    def has_load_permission(self, request: HttpRequest) -> bool:
        # A load makes a placement, as a cold request would.
        return request.user.has_perm("agents.add_placement")

    def get_readonly_fields(self, request: HttpRequest, obj: Model | None = None) -> list[str]:
        # Letting a checkpoint's code run is a permission of its own, not change_model.
        readonly = list(super().get_readonly_fields(request, obj))
        if not request.user.has_perm("agents.trust_remote_code"):
            readonly.append("trust_remote_code")
            if obj is not None and obj.trust_remote_code:  # another checkpoint would run too
                readonly += TRUSTED_CHECKPOINT
        return readonly

    @admin.action(
        description="Load: onto the agent where it can serve soonest", permissions=["load"]
    )
    def load_where_soonest(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        for model in queryset:
            try:
                placement = actions.ensure_placement(model)
            except actions.NoCapacity as exc:
                self.message_user(request, f"{model}: {exc}", messages.ERROR)
                continue
            self.message_user(
                request, f"{placement}: {placement.get_state_display()}", messages.SUCCESS
            )

    @admin.action(description="Load onto an agent you choose…", permissions=["load"])
    def load_onto_agent(
        self, request: HttpRequest, queryset: QuerySet[Model]
    ) -> HttpResponse | None:
        form = LoadOntoAgentForm(request.POST if "apply" in request.POST else None)
        if form.is_valid():
            agent = form.cleaned_data["agent"]
            for model in queryset:
                try:
                    placement = actions.load_on_agent(model, agent)
                except actions.NoCapacity as exc:
                    self.message_user(request, f"{model}: {exc}", messages.ERROR)
                    continue
                self.message_user(
                    request, f"{placement}: {placement.get_state_display()}", messages.SUCCESS
                )
            return None
        # The intermediate page: pick the agent, then post the same action again.
        return TemplateResponse(
            request,
            "admin/agents/load_onto_agent.html",
            {
                **self.admin_site.each_context(request),
                "title": "Load onto an agent",
                "models": queryset,
                "form": form,
                "opts": self.model._meta,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            },
        )

    def get_deleted_objects(self, objs: Any, request: HttpRequest) -> Any:
        # Placements and history go with a model by the action (actions.delete_model), not by
        # their own delete permissions, which no role has; adapters standing in the way are
        # the page's "protected" objects, as their PROTECT foreign key makes them.
        deleted, counts, _, protected = super().get_deleted_objects(objs, request)
        return deleted, counts, set(), protected

    def delete_model(self, request: HttpRequest, obj: Model) -> None:
        # Through the action, so its engines stop and its usage stays (actions.delete_model).
        try:
            actions.delete_model(obj.model_id)
        except actions.ModelInUse as exc:
            self.message_user(request, str(exc), messages.ERROR)

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[Model]) -> None:
        # Adapters first: a base goes once none of its adapters is left.
        for model in sorted(queryset, key=lambda model: model.base_id is None):
            self.delete_model(request, model)

    def get_queryset(self, request: HttpRequest) -> QuerySet[Model]:
        ready = Count("placements", filter=Q(placements__state=PlacementState.READY))
        return super().get_queryset(request).annotate(ready_total=ready)

    @admin.display(description="Ready replicas", ordering="ready_total")
    def ready_replicas(self, model: Model) -> int:
        return int(getattr(model, "ready_total", 0))

    @admin.display(description="Size", ordering="size_bytes")
    def size(self, model: Model) -> str:
        return format_bytes(model.size_bytes)

    @admin.display(description="GPU memory", ordering="gpu_memory_bytes")
    def gpu_memory(self, model: Model) -> str:
        return format_bytes(model.gpu_memory_bytes)


@admin.register(Placement)
class PlacementAdmin(admin.ModelAdmin[Placement]):
    list_display = [
        "model", "agent", "state", "cache_level", "progress_percent",
        "requests_in_flight", "requests_waiting", "lora_adapters", "last_used_at", "keep_alive",
        "error",
    ]  # fmt: skip
    list_filter = ["state", "cache_level", ("model", admin.RelatedOnlyFieldListFilter)]
    list_select_related = ["model", "agent"]
    search_fields = ["model__model_id", "agent__agent_id"]
    readonly_fields = [field.name for field in Placement._meta.fields]

    actions = ["to_host_ram", "to_local_disk", "to_nothing"]

    @admin.display(description="LoRA adapters held")
    def lora_adapters(self, placement: Placement) -> str:
        held = sorted(placement.adapters or {})
        if not placement.max_loras:
            return "-"
        return f"{len(held)} of {placement.max_loras}: {', '.join(held)}" if held else "none"

    def has_add_permission(self, request: HttpRequest) -> bool:
        # Placements are made by scheduling (a cold start or an operator's load), not by hand.
        return False

    def _step_down(self, request: HttpRequest, queryset: QuerySet[Placement], level: str) -> None:
        for placement in queryset:
            try:
                actions.unload(placement, level)
            except actions.CannotStepDown as exc:
                self.message_user(request, str(exc), messages.WARNING)
                continue
            self.message_user(request, f"{placement}: stepping down to {level}", messages.SUCCESS)

    def has_step_down_permission(self, request: HttpRequest) -> bool:
        return request.user.has_perm("agents.change_placement")

    @admin.action(description="Step down to host RAM (engine asleep)", permissions=["step_down"])
    def to_host_ram(self, request: HttpRequest, queryset: QuerySet[Placement]) -> None:
        self._step_down(request, queryset, CacheLevel.DRAM_CACHED)

    @admin.action(description="Step down to local disk (engine stopped)", permissions=["step_down"])
    def to_local_disk(self, request: HttpRequest, queryset: QuerySet[Placement]) -> None:
        self._step_down(request, queryset, CacheLevel.NVME_CACHED)

    @admin.action(description="Remove from the agent (files deleted)", permissions=["step_down"])
    def to_nothing(self, request: HttpRequest, queryset: QuerySet[Placement]) -> None:
        self._step_down(request, queryset, CacheLevel.NONE)

    @admin.display(description="Progress")
    def progress_percent(self, placement: Placement) -> str:
        progress = placement.progress
        return "-" if progress is None else f"{progress:.0%}"


@admin.register(LoadEvent)
class LoadEventAdmin(admin.ModelAdmin[LoadEvent]):
    list_display = [
        "queued_at", "kind", "model", "agent", "trigger", "outcome", "from_level", "to_level",
        "download_seconds", "engine_start_seconds", "engine_start", "first_token_seconds",
        "source", "short_error",
    ]  # fmt: skip
    list_filter = ["kind", "outcome", "trigger", "to_level", "engine_start", "compile_cache"]
    list_select_related = ["model", "agent"]
    search_fields = ["model__model_id", "agent__agent_id", "error"]
    date_hierarchy = "queued_at"
    ordering = ["-queued_at", "-id"]
    readonly_fields = [field.name for field in LoadEvent._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        # History is written by loads and unloads; the page stays viewable.
        return False

    @admin.display(description="Error")
    def short_error(self, event: LoadEvent) -> str:
        return event.error[:80]
