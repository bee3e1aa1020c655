"""Shapes of the node agent's HTTP contract, shared by the agent and the control plane.

Plain dataclasses and the standard library only: the control plane imports
this module, and the agent must stay free of Django. Requests are validated
by their `from_json`, which raises `ProtocolError` with a message fit for a
400 answer.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

# Agent states an agent reports about itself. The control plane adds OFFLINE and
# DRAINING from its own view (heartbeats missed, operator orders).
AGENT_REPORTED_STATES = ("IDLE", "LOADING_MODEL", "INFERRING", "DEGRADED", "DRAINING")
# On every error the agent itself answers (never on the engine's own answers): its code, so
# the gateway tells "this replica cannot serve" from "the engine refused this request".
AGENT_ERROR_HEADER = "X-Llmfleet-Agent-Error"
# A model's state on an agent (the control plane's Placement.state).
MODEL_STATES = ("DOWNLOADING", "LOADING_TO_GPU", "READY", "UNLOADING", "UNLOADED", "FAILED")
# Where a model's weights are, fastest to serve first.
CACHE_LEVELS = ("GPU_RESIDENT", "DRAM_CACHED", "NVME_CACHED", "NONE")
UNLOAD_TARGETS = ("DRAM_CACHED", "NVME_CACHED", "NONE")
ENGINES = ("vllm", "sim")


class ProtocolError(ValueError):
    """A body that does not follow the contract; the message says what is wrong."""


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError("the body must be a JSON object")
    return body


def _string(body: dict[str, Any], key: str, *, required: bool = True, default: str = "") -> str:
    value = body.get(key)
    if value is None:
        if required:
            raise ProtocolError(f"'{key}' is required")
        return default
    if not isinstance(value, str) or (required and not value.strip()):
        raise ProtocolError(
            f"'{key}' must be a non-empty string" if required else f"'{key}' must be a string"
        )
    return value


def _choice(body: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = _string(body, key)
    if value not in choices:
        raise ProtocolError(f"'{key}' must be one of {', '.join(choices)}, not {value!r}")
    return value


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it. Memory in bytes, utilization in percent."""

    index: int
    name: str
    memory_total: int
    memory_free: int
    utilization: float | None = None
    uuid: str = ""


@dataclass(frozen=True)
class RegisterRequest:
    """Body of `POST /api/agents/register`, sent by an agent when it starts.

    `base_url` is where the control plane reaches the agent's HTTP API.
    A host without a GPU sends an empty `gpus` list, never invented figures.
    """

    agent_id: str
    base_url: str
    version: str = ""
    state: str = "IDLE"
    gpus: tuple[GpuInfo, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body = asdict(self)
        body["gpus"] = [asdict(gpu) for gpu in self.gpus]
        return body


@dataclass(frozen=True)
class RegisterResponse:
    """The control plane's answer to a registration."""

    agent_id: str
    created: bool
    state: str
    heartbeat_interval_seconds: int


@dataclass(frozen=True)
class EngineSpec:
    """Which engine serves a model and its extra command-line arguments.

    `name` None means the agent's default engine.
    """

    name: str | None = None
    args: tuple[str, ...] = ()

    @classmethod
    def from_json(cls, body: Any) -> EngineSpec:
        if body is None:
            return cls()
        body = _object(body)
        name = body.get("name")
        if name is not None and name not in ENGINES:
            raise ProtocolError(f"'engine.name' must be one of {', '.join(ENGINES)}, not {name!r}")
        args = body.get("args", [])
        if not isinstance(args, list) or not all(isinstance(arg, str) for arg in args):
            raise ProtocolError("'engine.args' must be a list of strings")
        return cls(name=name, args=tuple(args))


@dataclass(frozen=True)
class LoadModelRequest:
    """Body of `POST /load_model`: bring a model to the GPU and answer once it serves."""

    model_id: str
    source: str
    revision: str = ""
    engine: EngineSpec = EngineSpec()

    @classmethod
    def from_json(cls, body: Any) -> LoadModelRequest:
        body = _object(body)
        source = _string(body, "source")
        if not source.startswith(("file://", "azure://")):
            raise ProtocolError("'source' must be a file:// or azure:// URI")
        return cls(
            model_id=_string(body, "model_id"),
            source=source,
            revision=_string(body, "revision", required=False),
            engine=EngineSpec.from_json(body.get("engine")),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {"engine": {"name": self.engine.name, "args": list(self.engine.args)}}


@dataclass(frozen=True)
class LoadTimings:
    """Seconds spent in each phase of a load; None for a phase that did not run."""

    download_seconds: float | None = None
    engine_start_seconds: float | None = None
    wake_seconds: float | None = None
    total_seconds: float = 0.0
    files_cached: bool = False


@dataclass(frozen=True)
class LoadModelResponse:
    model_id: str
    inference_endpoint_url: str
    timings: LoadTimings
    cache_state: str = "READY"
    cache_level: str = "GPU_RESIDENT"
    status: str = "success"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class UnloadModelRequest:
    """Body of `POST /unload_model`. Refused while requests are in flight unless `force`."""

    model_id: str
    to: str
    force: bool = False

    @classmethod
    def from_json(cls, body: Any) -> UnloadModelRequest:
        body = _object(body)
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise ProtocolError("'force' must be true or false")
        return cls(
            model_id=_string(body, "model_id"), to=_choice(body, "to", UNLOAD_TARGETS), force=force
        )


@dataclass(frozen=True)
class UnloadModelResponse:
    """`cache_level` is where the model ended up, which may be lower than asked (see `note`)."""

    model_id: str
    cache_state: str
    cache_level: str
    note: str = ""
    status: str = "success"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ModelStatus:
    """One model on the agent, as a heartbeat reports it. `last_used_at` is ISO 8601 UTC."""

    model_id: str
    cache_state: str
    cache_level: str
    inference_endpoint_url: str = ""
    engine: str = ""
    progress: float | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    download_bytes_per_s: float | None = None
    kv_cache_usage: float | None = None
    kv_cache_hit_rate: float | None = None
    requests_running: int = 0
    requests_waiting: int = 0
    requests_in_flight: int = 0
    last_used_at: str | None = None
    error: str = ""


@dataclass(frozen=True)
class DiskInfo:
    path: str
    total: int
    free: int
    models_bytes: int


@dataclass(frozen=True)
class HeartbeatResponse:
    """Answer to `POST /heartbeat`: the agent's whole state, polled by the control plane."""

    agent_id: str
    state: str
    version: str
    gpus: tuple[GpuInfo, ...]
    gpu_utilization: float | None
    gpu_memory_total: int
    gpu_memory_free: int
    vllm_queue_length: int
    disk: DiskInfo
    models: tuple[ModelStatus, ...]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> HeartbeatResponse:
        return cls(
            **body
            | {
                "gpus": tuple(GpuInfo(**gpu) for gpu in body["gpus"]),
                "disk": DiskInfo(**body["disk"]),
                "models": tuple(ModelStatus(**model) for model in body["models"]),
            }
        )


def error_body(code: str, message: str, model_id: str | None = None) -> dict[str, Any]:
    """The agent's error shape: `{"status": "error", "model_id", "error": {"code", "message"}}`."""
    return {"status": "error", "model_id": model_id, "error": {"code": code, "message": message}}
