"""Shapes of the node agent's HTTP contract, shared by the agent and the control plane.

Typed dataclasses, decoded by msgspec (`decode`): the control plane imports this
module, and the agent must stay free of Django. What crosses the wire is checked
field by field against these types, unknown fields are ignored and missing
optional ones take their defaults, so a peer one minor version apart works
(`CONTRACT_VERSION`, `check_contract`). Requests the agent takes are validated by
their `from_json`, which raises `ProtocolError` with a message fit for a 400 answer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any, Literal, TypeVar

import msgspec

# major.minor. A minor release only adds optional fields (and values nobody had to send);
# anything else is a new major, which the other side refuses (check_contract).
# 1.1: `contract` on heartbeats and registrations; `last_used_at` checked as a timestamp.
# 1.2: `engine_start`, `engine_start_note` and `compile_cache` in load timings; load progress
#      pushed to `POST /api/agents/<id>/progress` as it happens.
# 1.3: LoRA adapters: `adapters`, `max_loras` and `max_lora_rank` on model statuses; the
#      ADAPTER_HEADERS on proxied requests; `POST /load_adapter` and `/unload_adapter`.
# 1.4: `sources` (every source of the model, with labels) on load requests, beside `source`
#      (the one an agent of 1.3 uses), and the registered `manifest`'s identity; `source`
#      and `download_bytes` in load timings.
# 1.5: `engine.trust_remote_code` on load requests (the only way the checkpoint's own code
#      runs: engine arguments are held to nodeagent.engineargs by both sides); unloads'
#      `drain_seconds` (wait for the requests in flight instead of refusing).
# 1.6: `max_num_seqs` on model statuses and load responses (the gateway's seats per replica).
# 1.7: PRIORITY_CLASS_HEADER on proxied requests admitted in the `batch` class (and
#      SEQUENCES_HEADER on those of n > 1), and the agent's 503 `engine_busy` for one that
#      found no room on its engine in time.
# 1.8: `compile_cache_seconds` and `failed_sources` in load timings (a cold start's trace).
CONTRACT_VERSION = "1.8"


class AgentReportedState(StrEnum):
    """What an agent reports about itself. The control plane adds OFFLINE (heartbeats missed)
    and its own DRAINING and DEGRADED verdicts."""

    IDLE = "IDLE"
    LOADING_MODEL = "LOADING_MODEL"
    INFERRING = "INFERRING"
    DEGRADED = "DEGRADED"
    DRAINING = "DRAINING"


class ModelState(StrEnum):
    """A model's state on an agent (the control plane's Placement.state)."""

    DOWNLOADING = "DOWNLOADING"
    LOADING_TO_GPU = "LOADING_TO_GPU"
    READY = "READY"
    UNLOADING = "UNLOADING"
    UNLOADED = "UNLOADED"
    FAILED = "FAILED"


class CacheLevel(StrEnum):
    """Where a model's weights are, fastest to serve first (the eviction ladder)."""

    GPU_RESIDENT = "GPU_RESIDENT"
    DRAM_CACHED = "DRAM_CACHED"
    NVME_CACHED = "NVME_CACHED"
    NONE = "NONE"


AGENT_REPORTED_STATES = tuple(state.value for state in AgentReportedState)
# On every error the agent itself answers (never on the engine's own answers): its code, so
# the gateway tells "this replica cannot serve" from "the engine refused this request".
AGENT_ERROR_HEADER = "X-Llmfleet-Agent-Error"
# On a proxied request for a LoRA adapter of the model in the path (set by the gateway, which
# holds the catalog): the adapter's id (the `model` its body names), its store URI and
# revision. The agent loads the adapter into the engine first if it does not have it.
ADAPTER_HEADER = "X-Llmfleet-Adapter"
ADAPTER_SOURCE_HEADER = "X-Llmfleet-Adapter-Source"
ADAPTER_REVISION_HEADER = "X-Llmfleet-Adapter-Revision"
# On a proxied request admitted in the gateway's `batch` class (set by the gateway): the agent
# lets it into its engine only while seats stay free for others (nodeagent.batchgate).
PRIORITY_CLASS_HEADER = "X-Llmfleet-Priority-Class"
BATCH_CLASS = "batch"
# On a proxied request that asks for more than one sequence (`n`): how many, each of which
# takes one of the engine's max_num_seqs (absent: one).
SEQUENCES_HEADER = "X-Llmfleet-Sequences"
SOURCE_SCHEMES = ("file://", "azure://", "s3://", "gs://")
MODEL_STATES = tuple(state.value for state in ModelState)
CACHE_LEVELS = tuple(level.value for level in CacheLevel)
UNLOAD_TARGETS = (CacheLevel.DRAM_CACHED.value, CacheLevel.NVME_CACHED.value, CacheLevel.NONE.value)
ENGINES = ("vllm", "sim")

# Bounds of what the control plane stores (its columns), checked where the bytes arrive.
Count = Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]
Bytes = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]
Share = Annotated[float, msgspec.Meta(ge=0.0, le=1.0)]
Percent = Annotated[float, msgspec.Meta(ge=0.0, le=100.0)]
Seconds = Annotated[float, msgspec.Meta(ge=0.0)]
Rate = Annotated[float, msgspec.Meta(ge=0.0)]
Timestamp = Annotated[datetime, msgspec.Meta(tz=True)]
ModelId = Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
EngineStart = Literal["", "plain", "standby"]
CompileCacheOrigin = Literal["", "new", "local", "store", "discarded"]
AgentId = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
Url = Annotated[str, msgspec.Meta(max_length=500)]
Short = Annotated[str, msgspec.Meta(max_length=128)]
Version = Annotated[str, msgspec.Meta(max_length=64)]

T = TypeVar("T")


class ProtocolError(ValueError):
    """A body that does not follow the contract; the message says what is wrong."""


def decode(body: bytes | Any, kind: type[T]) -> T:
    """`body` (raw JSON, or what json.loads gave) as a `kind`, checked field by field.

    Unknown fields are ignored and missing optional ones default; a missing required
    field, a wrong type or a value out of bounds raises ProtocolError naming the field
    (`Expected `int`, got `null` - at `$.models[0].bytes_done``).
    """
    try:
        if isinstance(body, bytes | bytearray | memoryview):
            return msgspec.json.decode(body, type=kind)
        return msgspec.convert(body, type=kind)
    except msgspec.ValidationError as exc:
        raise ProtocolError(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None


def encode(value: Any) -> Any:
    """A contract object as JSON-ready builtins (timestamps as RFC 3339, enums as strings)."""
    return msgspec.to_builtins(value)


def check_contract(version: str) -> None:
    """Raise ProtocolError unless a peer speaking `version` works with this one: the same
    major version (a minor apart only adds optional fields, which both sides tolerate)."""
    major, _, minor = version.partition(".")
    if not (major.isdigit() and minor.isdigit()):
        raise ProtocolError(f"contract version {version!r} is not major.minor")
    if major != CONTRACT_VERSION.partition(".")[0]:
        raise ProtocolError(
            f"contract {version} is not compatible with this side's {CONTRACT_VERSION}"
            " (majors differ)"
        )


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


def _flag(body: dict[str, Any], key: str) -> bool:
    value = body.get(key, False)
    if not isinstance(value, bool):
        raise ProtocolError(f"'{key}' must be true or false")
    return value


def _source(body: dict[str, Any]) -> str:
    source = _string(body, "source")
    if not source.startswith(SOURCE_SCHEMES):
        raise ProtocolError("'source' must be a file://, azure://, s3:// or gs:// URI")
    return source


def _choice(body: dict[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = _string(body, key)
    if value not in choices:
        raise ProtocolError(f"'{key}' must be one of {', '.join(choices)}, not {value!r}")
    return value


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML sees it. Memory in bytes, utilization in percent."""

    index: Count
    name: Short
    memory_total: Bytes
    memory_free: Bytes
    utilization: Percent | None = None
    uuid: Short = ""


@dataclass(frozen=True)
class RegisterRequest:
    """Body of `POST /api/agents/register`, sent by an agent when it starts.

    `base_url` is where the control plane reaches the agent's HTTP API.
    A host without a GPU sends an empty `gpus` list, never invented figures.
    """

    agent_id: AgentId
    base_url: Url
    version: Version = ""
    state: AgentReportedState = AgentReportedState.IDLE
    gpus: tuple[GpuInfo, ...] = ()
    labels: dict[str, str] = field(default_factory=dict)
    contract: str = "1.0"

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = encode(self)
        return body


@dataclass(frozen=True)
class RegisterResponse:
    """The control plane's answer to a registration."""

    agent_id: AgentId
    created: bool
    state: str
    heartbeat_interval_seconds: int
    # Issued once, at enrolment or rotation: the agent keeps it and never sees it again.
    credential: str = ""
    contract: str = "1.0"


@dataclass(frozen=True)
class EngineSpec:
    """Which engine serves a model and its extra command-line arguments.

    `name` None means the agent's default engine. `trust_remote_code` lets the engine run the
    checkpoint's own Python (an agent refuses it unless its operator allows remote code).
    """

    name: str | None = None
    args: tuple[str, ...] = ()
    trust_remote_code: bool = False

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
        return cls(name=name, args=tuple(args), trust_remote_code=_flag(body, "trust_remote_code"))


@dataclass(frozen=True)
class SourceSpec:
    """One place a model is published, with labels saying where it is (cloud, region, zone):
    an agent reads from the source nearest to it first (`order_sources`)."""

    uri: str
    labels: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Any, where: str) -> SourceSpec:
        if not isinstance(body, dict):
            raise ProtocolError(f"'{where}' must be an object with 'uri' and 'labels'")
        uri = body.get("uri")
        if not isinstance(uri, str) or not uri.startswith(SOURCE_SCHEMES):
            raise ProtocolError(f"'{where}.uri' must be a file://, azure://, s3:// or gs:// URI")
        labels = body.get("labels") or {}
        if not isinstance(labels, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in labels.items()
        ):
            raise ProtocolError(f"'{where}.labels' must be an object of strings")
        return cls(uri, dict(labels))


# The labels that say where a host or a source is, widest first: a zone lies in a region,
# which lies in a cloud.
LOCALITY_LABELS = ("cloud", "region", "zone")


def nearness(source: SourceSpec, labels: Mapping[str, str]) -> tuple[bool, ...]:
    """How near a source is to a host with `labels`, as (same zone, same region, same
    cloud), compared as a tuple. A level counts only where every wider level both sides
    name agrees: Azure names its zones "1", "2", "3" in every region, so zone 1 of another
    region is not near."""
    same: list[bool] = []
    agreeing = True
    for key in LOCALITY_LABELS:
        ours, theirs = labels.get(key), source.labels.get(key)
        if ours and theirs and ours != theirs:
            agreeing = False
        same.append(agreeing and bool(ours) and ours == theirs)
    return tuple(reversed(same))


def order_sources(sources: Sequence[SourceSpec], labels: Mapping[str, str]) -> list[SourceSpec]:
    """The sources in the order an agent with `labels` tries them: those sharing its zone,
    then its region, then its cloud, then the rest, each group in catalog order.

    Both sides call it: the agent to choose, the control plane to estimate the download
    from the bandwidth observed from the source the agent will choose."""
    return sorted(sources, key=lambda source: nearness(source, labels), reverse=True)


def source_store(uri: str) -> str:
    """The store a source URI is in (`s3://bucket`, `azure://container`, `file://`): what
    bandwidth is observed per, since every model in one bucket comes down the same way."""
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}" if scheme != "file" else "file://"


@dataclass(frozen=True)
class LoadModelRequest:
    """Body of `POST /load_model`: bring a model to the GPU and answer once it serves.

    `sources` lists every place the model is published (the same manifest in each); an agent
    of contract 1.3 or older reads `source` alone, so the control plane sets it to the source
    that agent would choose first."""

    model_id: str
    source: str
    revision: str = ""
    engine: EngineSpec = EngineSpec()
    sources: tuple[SourceSpec, ...] = ()
    # The registered manifest's identity (store.base.identity; "" when unknown): a source
    # holding another manifest is refused and the next one tried.
    manifest: str = ""

    @classmethod
    def from_json(cls, body: Any) -> LoadModelRequest:
        body = _object(body)
        listed = body.get("sources") or []
        if not isinstance(listed, list):
            raise ProtocolError("'sources' must be a list")
        return cls(
            model_id=_string(body, "model_id"),
            source=_source(body),
            revision=_string(body, "revision", required=False),
            engine=EngineSpec.from_json(body.get("engine")),
            sources=tuple(
                SourceSpec.from_json(item, f"sources[{index}]") for index, item in enumerate(listed)
            ),
            manifest=_string(body, "manifest", required=False),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self) | {
            "engine": {
                "name": self.engine.name,
                "args": list(self.engine.args),
                "trust_remote_code": self.engine.trust_remote_code,
            },
            "sources": [asdict(source) for source in self.sources],
        }

    @property
    def all_sources(self) -> tuple[SourceSpec, ...]:
        """`sources`, or `source` alone from a control plane that sends no list."""
        return self.sources or (SourceSpec(self.source),)


@dataclass(frozen=True)
class LoadTimings:
    """Seconds spent in each phase of a load; None for a phase that did not run."""

    download_seconds: Seconds | None = None
    engine_start_seconds: Seconds | None = None
    wake_seconds: Seconds | None = None
    total_seconds: Seconds = 0.0
    files_cached: bool = False
    # How the engine started: "plain" (a new process importing everything) or "standby" (a
    # process that had imported it all became the engine); "" when none started (a wake, or
    # the engine already served). For a plain start of vLLM, `engine_start_note` says why.
    engine_start: EngineStart = ""
    engine_start_note: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    # The engine's compile cache (nodeagent.compilecache): "new", "local", "store",
    # "discarded"; "" for engines without one.
    compile_cache: CompileCacheOrigin = ""
    # Where the files came from (the source a download used, or the one the cached copy was
    # downloaded from), and how many bytes this load downloaded (a resumed download less).
    source: Annotated[str, msgspec.Meta(max_length=1000)] = ""
    download_bytes: Bytes = 0
    # The seconds spent getting the engine's compile cache (within engine_start_seconds), and
    # the sources a download gave up on before `source` served it ("uri: why", in order).
    compile_cache_seconds: Seconds | None = None
    failed_sources: Annotated[
        tuple[Annotated[str, msgspec.Meta(max_length=1000)], ...], msgspec.Meta(max_length=16)
    ] = ()


@dataclass(frozen=True)
class LoadModelResponse:
    model_id: ModelId
    inference_endpoint_url: Url
    timings: LoadTimings = LoadTimings()
    cache_state: ModelState = ModelState.READY
    cache_level: CacheLevel = CacheLevel.GPU_RESIDENT
    status: str = "success"
    # LoRA: how many adapters the engine holds at most (0: no LoRA) and the rank it takes.
    max_loras: Count = 0
    max_lora_rank: Count = 0
    # How many requests the engine runs at once (0: unknown): the gateway's seats.
    max_num_seqs: Count = 0

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = encode(self)
        return body


# The longest an unload may wait for the model's requests in flight to finish.
MAX_DRAIN_SECONDS = 600.0


@dataclass(frozen=True)
class UnloadModelRequest:
    """Body of `POST /unload_model`. Refused while requests are in flight unless `force`, or
    unless they finish within `drain_seconds` (the control plane routes none there meanwhile)."""

    model_id: str
    to: str
    force: bool = False
    drain_seconds: float = 0.0

    @classmethod
    def from_json(cls, body: Any) -> UnloadModelRequest:
        body = _object(body)
        force = _flag(body, "force")
        drain = body.get("drain_seconds", 0)
        if isinstance(drain, bool) or not isinstance(drain, int | float):
            raise ProtocolError("'drain_seconds' must be a number of seconds")
        if not 0 <= drain <= MAX_DRAIN_SECONDS:
            raise ProtocolError(f"'drain_seconds' must be between 0 and {MAX_DRAIN_SECONDS:g}")
        return cls(
            model_id=_string(body, "model_id"), to=_choice(body, "to", UNLOAD_TARGETS),
            force=force, drain_seconds=float(drain),
        )  # fmt: skip


@dataclass(frozen=True)
class UnloadModelResponse:
    """`cache_level` is where the model ended up, which may be lower than asked (see `note`)."""

    model_id: ModelId
    cache_state: ModelState
    cache_level: CacheLevel
    note: str = ""
    status: str = "success"

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = encode(self)
        return body


@dataclass(frozen=True)
class AdapterRef:
    """A LoRA adapter of a model, as the gateway names it on a proxied request (the
    ADAPTER_HEADERS) or an operator in `POST /load_adapter`."""

    adapter_id: str
    source: str
    revision: str = ""

    @classmethod
    def from_headers(cls, headers: Any) -> AdapterRef | None:
        adapter_id = headers.get(ADAPTER_HEADER)
        if adapter_id is None:
            return None
        return cls.from_json(
            {
                "adapter_id": adapter_id,
                "source": headers.get(ADAPTER_SOURCE_HEADER),
                "revision": headers.get(ADAPTER_REVISION_HEADER, ""),
            }
        )

    @classmethod
    def from_json(cls, body: Any) -> AdapterRef:
        body = _object(body)
        adapter_id = _string(body, "adapter_id")
        if len(adapter_id) > 200:
            raise ProtocolError("'adapter_id' is longer than 200 characters")
        return cls(adapter_id, _source(body), _string(body, "revision", required=False))

    def headers(self) -> dict[str, str]:
        return {
            ADAPTER_HEADER: self.adapter_id,
            ADAPTER_SOURCE_HEADER: self.source,
            ADAPTER_REVISION_HEADER: self.revision,
        }


@dataclass(frozen=True)
class LoadAdapterRequest:
    """Body of `POST /load_adapter`: load a LoRA adapter into the engine serving `model_id`."""

    model_id: str
    adapter: AdapterRef

    @classmethod
    def from_json(cls, body: Any) -> LoadAdapterRequest:
        return cls(_string(_object(body), "model_id"), AdapterRef.from_json(body))


@dataclass(frozen=True)
class UnloadAdapterRequest:
    """Body of `POST /unload_adapter`. Refused while the adapter has requests in flight
    unless `force`."""

    model_id: str
    adapter_id: str
    force: bool = False

    @classmethod
    def from_json(cls, body: Any) -> UnloadAdapterRequest:
        body = _object(body)
        force = _flag(body, "force")
        return cls(_string(body, "model_id"), _string(body, "adapter_id"), force)


@dataclass(frozen=True)
class AdapterStatus:
    """A LoRA adapter loaded into a model's engine, as heartbeats and adapter calls report it."""

    adapter_id: ModelId
    requests_total: Bytes = 0
    requests_in_flight: Count = 0
    loaded_at: Timestamp | None = None
    last_used_at: Timestamp | None = None
    load_seconds: Seconds | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = encode(self)
        return body


@dataclass(frozen=True)
class ModelStatus:
    """One model on the agent, as a heartbeat reports it. `last_used_at` is RFC 3339 on the
    wire, with its offset."""

    model_id: ModelId
    cache_state: ModelState
    cache_level: CacheLevel
    inference_endpoint_url: Url = ""
    engine: Short = ""
    progress: Share | None = None
    bytes_done: Bytes = 0
    bytes_total: Bytes = 0
    download_bytes_per_s: Rate | None = None
    kv_cache_usage: Share | None = None
    kv_cache_hit_rate: Share | None = None
    requests_running: Count = 0
    requests_waiting: Count = 0
    requests_in_flight: Count = 0
    last_used_at: Timestamp | None = None
    error: str = ""
    # What a load is doing now, in words for people ("downloading", "verifying", "starting
    # the engine (standby)"); "" when none runs.
    phase: Annotated[str, msgspec.Meta(max_length=200)] = ""
    # LoRA: how many adapters its engine holds at most (0: started without LoRA), the
    # highest rank it takes, and the adapters it holds now.
    max_loras: Count = 0
    max_lora_rank: Count = 0
    # How many requests its engine runs at once (0: unknown): the gateway's seats.
    max_num_seqs: Count = 0
    adapters: Annotated[tuple[AdapterStatus, ...], msgspec.Meta(max_length=1024)] = ()


@dataclass(frozen=True)
class LoadProgress:
    """Body of the agent's `POST /api/agents/<agent_id>/progress`: its loading models, sent
    as their phases change (nodeagent.progress)."""

    agent_id: AgentId
    models: tuple[ModelStatus, ...] = ()
    contract: str = CONTRACT_VERSION

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = encode(self)
        return body

    @classmethod
    def from_json(cls, body: bytes | Any) -> LoadProgress:
        report = decode(body, cls)
        check_contract(report.contract)
        return report


@dataclass(frozen=True)
class DiskInfo:
    path: str
    total: Bytes
    free: Bytes
    models_bytes: Bytes


@dataclass(frozen=True)
class HeartbeatResponse:
    """Answer to `POST /heartbeat`: the agent's whole state, polled by the control plane."""

    agent_id: AgentId
    state: AgentReportedState
    version: Version
    disk: DiskInfo
    gpus: tuple[GpuInfo, ...] = ()
    gpu_utilization: Percent | None = None
    gpu_memory_total: Bytes = 0
    gpu_memory_free: Bytes = 0
    vllm_queue_length: Count = 0
    models: tuple[ModelStatus, ...] = ()
    contract: str = "1.0"

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = encode(self)
        return body

    @classmethod
    def from_json(cls, body: bytes | Any) -> HeartbeatResponse:
        """Decode and check a heartbeat (ProtocolError says which field is wrong)."""
        beat = decode(body, cls)
        check_contract(beat.contract)
        return beat


def error_body(code: str, message: str, model_id: str | None = None) -> dict[str, Any]:
    """The agent's error shape: `{"status": "error", "model_id", "error": {"code", "message"}}`."""
    return {"status": "error", "model_id": model_id, "error": {"code": code, "message": message}}
