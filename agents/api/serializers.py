"""Serializers of the fleet API."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions, serializers

from agents.choices import REPORTED_AGENT_STATES, CacheLevel
from agents.models import TRUSTED_CHECKPOINT, Agent, LoadEvent, Model, Placement
from agents.validators import (
    mirror_problem,
    validate_agent_address,
    validate_agent_id,
    validate_base_url,
)
from nodeagent.protocol import GpuInfo, ProtocolError, RegisterRequest, check_contract


class PlacementSerializer(serializers.ModelSerializer[Placement]):
    agent = serializers.SlugRelatedField[Agent](slug_field="agent_id", read_only=True)
    model = serializers.SlugRelatedField[Model](slug_field="model_id", read_only=True)
    progress = serializers.FloatField(read_only=True, allow_null=True)

    class Meta:
        model = Placement
        fields = [
            "id", "agent", "model", "state", "cache_level", "inference_endpoint_url",
            "progress", "bytes_done", "bytes_total", "kv_cache_hit_rate", "kv_cache_usage",
            "requests_in_flight", "requests_waiting", "last_used_at", "keep_alive", "ready_at",
            "error", "created_at", "updated_at",
        ]  # fmt: skip


class AgentPlacementSerializer(PlacementSerializer):
    class Meta(PlacementSerializer.Meta):
        fields = ["model", "state", "cache_level", "progress", "requests_in_flight", "last_used_at"]


class AgentSerializer(serializers.ModelSerializer[Agent]):
    placements = AgentPlacementSerializer(many=True, read_only=True)

    class Meta:
        model = Agent
        fields = [
            "agent_id", "base_url", "state", "reported_state", "drained_at", "version", "labels",
            "gpus", "gpu_name", "gpu_count", "gpu_memory_total", "gpu_memory_free",
            "gpu_utilization", "engine_queue_length", "last_heartbeat_at", "heartbeat_failures",
            "contract_version", "contract_error", "contract_error_at", "contract_rejections",
            "registered_at", "updated_at", "placements",
        ]  # fmt: skip
        read_only_fields = fields


class ModelSerializer(serializers.ModelSerializer[Model]):
    class Meta:
        model = Model
        fields = [
            "model_id", "kind", "source", "source_labels", "mirrors", "manifest", "revision",
            "size_bytes", "gpu_memory_bytes",
            "engine_args", "trust_remote_code", "keep_alive", "max_keep_alive", "min_replicas",
            "max_replicas", "pinned", "enabled", "owned_by", "created_at", "updated_at",
        ]  # fmt: skip
        read_only_fields = ["created_at", "updated_at"]
        extra_kwargs = {
            "size_bytes": {"min_value": 0},
            "gpu_memory_bytes": {"min_value": 0},
            "max_replicas": {"min_value": 1},
        }

    def _may_trust(self) -> bool:
        user = getattr(self.context.get("request"), "user", None)
        return bool(user and user.has_perm("agents.trust_remote_code"))

    def validate_trust_remote_code(self, value: bool) -> bool:
        """Letting a checkpoint's code run is a permission of its own (not change_model)."""
        current = self.instance.trust_remote_code if self.instance is not None else False
        if value != current and not self._may_trust():
            raise exceptions.PermissionDenied(
                "Setting trust_remote_code needs the 'Can let a model run its checkpoint's code' "
                "permission (agents.trust_remote_code)."
            )
        return value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        # A PATCH may carry only one of the two: compare with the stored other.
        current = self.instance
        if current is not None and current.trust_remote_code and not self._may_trust():
            # Another checkpoint under a trusted entry would run its code just the same.
            moved = [
                f for f in TRUSTED_CHECKPOINT if f in attrs and attrs[f] != getattr(current, f)
            ]
            if moved:
                raise exceptions.PermissionDenied(
                    f"{current.model_id} runs its checkpoint's code: changing {', '.join(moved)} "
                    "needs the permission agents.trust_remote_code."
                )
        low = attrs.get("min_replicas", current.min_replicas if current else 0)
        high = attrs.get("max_replicas", current.max_replicas if current else 1)
        if high < low:
            raise serializers.ValidationError(
                {"max_replicas": f"Must be at least min_replicas ({low})."}
            )
        problem = mirror_problem(
            attrs.get("source", current.source if current else ""),
            attrs.get("mirrors", current.mirrors if current else []),
            adapter=current is not None and current.base_id is not None,
        )
        if problem:
            raise serializers.ValidationError({"mirrors": problem})
        return attrs


class GpuInfoSerializer(serializers.Serializer[GpuInfo]):
    index = serializers.IntegerField(min_value=0)
    name = serializers.CharField(max_length=128)
    memory_total = serializers.IntegerField(min_value=0)
    memory_free = serializers.IntegerField(min_value=0)
    utilization = serializers.FloatField(
        min_value=0, max_value=100, allow_null=True, required=False, default=None
    )
    uuid = serializers.CharField(max_length=128, required=False, default="", allow_blank=True)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if attrs["memory_free"] > attrs["memory_total"]:
            raise serializers.ValidationError({"memory_free": "Exceeds memory_total."})
        return attrs


class RegisterSerializer(serializers.Serializer[RegisterRequest]):
    """Validates `nodeagent.protocol.RegisterRequest` as an agent sends it."""

    agent_id = serializers.CharField(max_length=128, validators=[validate_agent_id])
    base_url = serializers.CharField(max_length=500, validators=[validate_base_url])
    version = serializers.CharField(max_length=64, required=False, default="", allow_blank=True)
    state = serializers.ChoiceField(
        choices=[state.value for state in REPORTED_AGENT_STATES], required=False, default="IDLE"
    )
    gpus = GpuInfoSerializer(many=True, required=False, default=list)
    labels = serializers.DictField(
        child=serializers.CharField(max_length=256, allow_blank=True), required=False, default=dict
    )
    contract = serializers.CharField(
        max_length=16, required=False, default="1.0",
        help_text="The agent contract's major.minor the agent speaks (absent: 1.0).",
    )  # fmt: skip

    def validate_base_url(self, value: str) -> str:
        try:
            validate_agent_address(
                value,
                allow_loopback=settings.AGENT_ALLOW_LOOPBACK,
                allow_private=settings.AGENT_ALLOW_PRIVATE_NETWORKS,
            )
        except DjangoValidationError as exc:
            raise serializers.ValidationError(exc.messages) from None
        return value.rstrip("/")

    def validate_contract(self, value: str) -> str:
        try:
            check_contract(value)
        except ProtocolError as exc:
            raise serializers.ValidationError(str(exc)) from None
        return value

    def to_request(self) -> RegisterRequest:
        data = self.validated_data
        return RegisterRequest(
            agent_id=data["agent_id"],
            base_url=data["base_url"],
            version=data["version"],
            state=data["state"],
            gpus=tuple(GpuInfo(**gpu) for gpu in data["gpus"]),
            labels=dict(data["labels"]),
            contract=data["contract"],
        )


class RegisterResponseSerializer(serializers.Serializer[Any]):
    agent_id = serializers.CharField()
    created = serializers.BooleanField()
    state = serializers.CharField()
    heartbeat_interval_seconds = serializers.IntegerField()


class LoadEventSerializer(serializers.ModelSerializer[LoadEvent]):
    agent = serializers.SlugRelatedField[Agent](slug_field="agent_id", read_only=True)
    model = serializers.SlugRelatedField[Model](slug_field="model_id", read_only=True)

    class Meta:
        model = LoadEvent
        fields = [
            "id", "agent", "model", "placement", "kind", "trigger", "outcome", "from_level",
            "to_level", "queued_at", "started_at", "finished_at", "queue_seconds",
            "download_seconds", "engine_start_seconds", "engine_start", "engine_start_note",
            "compile_cache",
            "first_token_seconds", "bytes_downloaded", "source", "error",
        ]  # fmt: skip
        read_only_fields = fields


class LoadRequestSerializer(serializers.Serializer[None]):
    agent = serializers.CharField(
        required=False, help_text="agent_id to load onto; omitted: the best agent"
    )


class UnloadRequestSerializer(serializers.Serializer[None]):
    to = serializers.ChoiceField(
        choices=[CacheLevel.DRAM_CACHED, CacheLevel.NVME_CACHED, CacheLevel.NONE],
        help_text="the level to step down to",
    )
