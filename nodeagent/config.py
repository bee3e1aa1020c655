"""The node agent's settings, declared once in `SETTINGS`: each one a command-line flag with an
environment fallback. The parser, `.env.example`'s agent section and the settings page of the
docs (controlplane.settingsdoc) are all made from that table, so none can drift from another.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from nodeagent import __version__
from nodeagent.protocol import ENGINES
from nodeagent.tracing import traces_endpoint
from nodeagent.values import (
    at_least,
    boolean,
    count_or_auto,
    directory,
    engine_user,
    float_between,
    mb_per_s,
    mib,
    names,
    optional_path,
    parse_bytes,
    parse_labels,
    positive_int,
)


@dataclass(frozen=True)
class SimSettings:
    """Timings of the simulated engine (its defaults are the agent's --sim-* defaults too)."""

    load_seconds: float = 2.0
    ttft_ms: float = 20.0
    tpot_ms: float = 5.0
    wake_seconds: float = 0.5
    max_num_seqs: int = 8
    stop_seconds: float = 0.0
    # Its prefix cache (vLLM's automatic prefix caching, modelled): KV blocks of this many
    # prompt tokens, at most this many kept (least recently used out), and the prefill time
    # per prompt token not found in it (added to the time to first token).
    block_tokens: int = 16
    cache_blocks: int = 4096
    prefill_ms_per_token: float = 0.0
    # A file to append each request the engine takes to, one JSON line (model and prompt):
    # what tests check "sent once" against. Empty: none.
    request_log: str = ""


@dataclass(frozen=True)
class AgentConfig:
    """The settings, parsed: what every part of the agent reads (defaults live in SETTINGS)."""

    agent_id: str
    host: str
    port: int
    advertise_url: str
    token: str
    credential_file: Path | None
    cache_dir: Path
    control_plane_url: str
    engine: str
    engine_python: str
    gpu_memory_share: float
    load_timeout: float
    # Seconds a source may keep failing a download before the model's next source takes over.
    source_failover_seconds: float
    stop_grace: float
    drain_seconds: float
    labels: dict[str, str]
    cache_max_bytes: int
    download_concurrency: int
    download_range_bytes: int
    download_limit_bytes_per_s: float
    download_direct_io: bool
    # Standby engines kept ready (None: one per GPU on a GPU host, one on a CPU host, none
    # when the default engine is sim); 0 starts every engine plainly.
    standby_engines: int | None
    standby_fork_children: bool
    # Publish compile caches to the store and take other agents' (False: this agent's own only).
    share_compile_cache: bool
    # Engines run as this user (name or uid; "": the agent's own), with the variables of the
    # agent's environment named here on top of the minimal one (nodeagent.engines.identity).
    engine_user: str
    engine_env: tuple[str, ...]
    # Whether a model whose catalog entry sets trust_remote_code may run its checkpoint's own
    # Python here (the host's operator decides, beside the control plane's permission).
    allow_remote_code: bool
    # Engines publish their KV-cache events; the agent follows them (nodeagent.kvevents).
    kv_events: bool
    # Batch-class requests enter an engine only while this share of its max_num_seqs stays
    # free for others, and wait at most this long for that (nodeagent.batchgate).
    batch_reserve_percent: float
    batch_wait_seconds: float
    sim: SimSettings
    # Traces (nodeagent.tracing): OpenTelemetry's variables; both empty is tracing off.
    otlp_endpoint: str
    otlp_traces_endpoint: str
    trace_sample_percent: float
    event_loop: str
    log_level: str

    def standby_count(self, gpu_count: int) -> int:
        if self.standby_engines is not None:
            return self.standby_engines
        if self.engine != "vllm":
            return 0
        return max(gpu_count, 1)

    @property
    def credential_path(self) -> Path:
        """Where the credential the control plane issued at enrolment is kept (mode 0600)."""
        return self.credential_file or self.cache_dir / "agent-credential"

    @property
    def traces_endpoint(self) -> str:
        """Where this agent's spans and its engines' go ('': tracing is off)."""
        return traces_endpoint({
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.otlp_endpoint,
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": self.otlp_traces_endpoint,
        })  # fmt: skip

    @property
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def logs_dir(self) -> Path:
        return self.cache_dir / "logs"


# --- the table ---


@dataclass(frozen=True)
class Setting:
    """One setting: its flag, its variable, its default (as the flag would be written, so the
    docs show what an operator types), how its text is read, and what it does."""

    flag: str
    env: str
    default: str
    parse: Callable[[str], Any]
    help: str
    choices: tuple[str, ...] = ()
    # The AgentConfig field it fills (sim_x: SimSettings.x); by default the flag's name.
    field: str = ""
    section: str = ""

    @property
    def dest(self) -> str:
        return self.field or self.flag.removeprefix("--").replace("-", "_")


def _section(title: str, *settings: Setting) -> tuple[Setting, ...]:
    return tuple(replace(setting, section=title) for setting in settings)


_SIM = SimSettings()

SETTINGS: tuple[Setting, ...] = (
    *_section(
        "Identity and network",
        Setting("--agent-id", "AGENT_ID", "", str,
                "this agent's unique name in the fleet (empty: the host's name)"),
        Setting("--host", "AGENT_HOST", "127.0.0.1", str,
                "address to listen on"),
        Setting("--port", "AGENT_PORT", "8100", int,
                "port to listen on"),
        Setting("--advertise-url", "AGENT_ADVERTISE_URL", "", str,
                "URL the control plane and clients use to reach this agent (empty: "
                "http://HOST:PORT)"),
        Setting("--control-plane-url", "CONTROL_PLANE_URL", "", str,
                "control plane to register with, e.g. http://fleet:8000 (empty: serve "
                "unregistered)"),
        Setting("--labels", "AGENT_LABELS", "", parse_labels,
                "labels for scheduling, e.g. zone=eu-1a,tier=a (zone, region and cloud also pick "
                "the nearest source of a model)"),
    ),
    *_section(
        "Credentials",
        Setting("--token", "AGENT_TOKEN", "", str,
                "the fleet's enrolment token: presented once, to get this agent's own credential "
                "(without --control-plane-url: the one token the agent's API takes)"),
        Setting("--token-file", "AGENT_TOKEN_FILE", "", str,
                "file holding the token, instead of --token"),
        Setting("--credential-file", "AGENT_CREDENTIAL_FILE", "", optional_path,
                "where the credential issued at enrolment is kept (empty: "
                "CACHE_DIR/agent-credential)"),
    ),
    *_section(
        "Engines",
        Setting("--engine", "AGENT_ENGINE", "vllm", str,
                "default engine for models: vllm, or sim (simulated, for tests and fleet-scale "
                "benchmarks)", choices=ENGINES),
        Setting("--engine-python", "AGENT_ENGINE_PYTHON", "python3", str,
                "interpreter of the virtual environment that has vLLM (make builds .venv-engine)"),
        Setting("--gpu-memory-share", "AGENT_GPU_MEMORY_SHARE", "0.9", float_between(0.05, 1.0),
                "share of GPU memory one model's engine may take (vLLM --gpu-memory-utilization)"),
        Setting("--load-timeout", "AGENT_LOAD_TIMEOUT", "900", float,
                "seconds a load may take"),
        Setting("--stop-grace", "AGENT_STOP_GRACE", "15", float,
                "seconds between SIGTERM and SIGKILL of an engine"),
        Setting("--drain-seconds", "AGENT_DRAIN_SECONDS", "30", float,
                "on SIGTERM, seconds in-flight requests may take to finish before engines stop"),
        Setting("--standby-engines", "AGENT_STANDBY_ENGINES", "auto", count_or_auto,
                "vLLM processes kept ready with everything imported, each becoming the engine of "
                "the next model to load (seconds instead of half a minute); auto: one per GPU, one"
                " on a CPU host, none if --engine is sim; 0: every engine starts plainly"),
        Setting("--standby-fork-children", "AGENT_STANDBY_FORK_CHILDREN", "true", boolean,
                "let a standby fork vLLM's EngineCore and worker (they inherit its imports) "
                "instead of spawning them, where nothing has initialized CUDA; false: spawn, as "
                "vLLM does"),
        Setting("--engine-user", "AGENT_ENGINE_USER", "", engine_user,
                "run engines (and standbys) as this user, name or uid, so that code in an engine "
                "cannot read the agent's credential file or environment; needs the agent to run as"
                " root, and the cache directory readable by that user (empty: the agent's own "
                "user)"),
        Setting("--engine-env", "AGENT_ENGINE_ENV", "", names,
                "names of more variables of the agent's environment that engines get, comma "
                "separated (engines get a minimal environment: PATH, locale, and how this host "
                "runs vLLM: VLLM_*, CUDA_*, NCCL_*, OMP_*, HF_*...; never one whose name says "
                "secret)"),
        Setting("--allow-remote-code", "AGENT_ALLOW_REMOTE_CODE", "false", boolean,
                "run a checkpoint's own Python code (vLLM's --trust-remote-code) for models whose "
                "catalog entry sets trust_remote_code; false: such loads are refused on this host"),
        Setting("--kv-events", "AGENT_KV_EVENTS", "true", boolean,
                "have each engine publish its KV-cache events (vLLM's --kv-events-config) and "
                "serve the blocks it holds at GET /models/{model}/kv, for the gateway's precise "
                "routing"),
        Setting(
            "--batch-reserve-percent", "AGENT_BATCH_RESERVE_PERCENT", "10", float_between(0, 90),
            "requests of the gateway's batch class (Batch API lines) enter an engine only while "
            "this percent of its max_num_seqs (at least one seat) stays free for others",
        ),
        Setting("--batch-wait-seconds", "AGENT_BATCH_WAIT_SECONDS", "20", at_least(0.1, float),
                "how long a batch-class request waits here for room on its engine before the agent"
                " answers 503 engine_busy (keep it under the gateway's "
                "GATEWAY_STREAM_HEADERS_TIMEOUT_SECONDS)"),
    ),
    *_section(
        "Model cache and downloads",
        Setting("--cache-dir", "AGENT_CACHE_DIR", "~/.cache/llmfleet", directory,
                "local (NVMe) directory for model files, engine logs and vLLM's caches"),
        Setting("--cache-max-bytes", "AGENT_CACHE_MAX_BYTES", "0", parse_bytes,
                "largest size of the model cache, e.g. 500G; unused models are deleted least "
                "recently used first to make room (0: only the disk's free space limits it)"),
        Setting(
            "--source-failover", "AGENT_SOURCE_FAILOVER_SECONDS", "20", float,
            "seconds a model's source may keep failing a download before its next source (a mirror"
            " in another store) takes over", field="source_failover_seconds",
        ),
        Setting("--download-concurrency", "AGENT_DOWNLOAD_CONCURRENCY", "8", positive_int,
                "range reads in flight per download"),
        Setting(
            "--download-range-mib", "AGENT_DOWNLOAD_RANGE_MIB", "16", mib,
            "size of each range read, MiB", field="download_range_bytes",
        ),
        Setting(
            "--download-limit-mb-s", "AGENT_DOWNLOAD_LIMIT_MB_S", "0", mb_per_s,
            "cap on download bandwidth, MB/s (0: none)", field="download_limit_bytes_per_s",
        ),
        Setting("--download-direct-io", "AGENT_DOWNLOAD_DIRECT_IO", "true", boolean,
                "write downloads with O_DIRECT where the filesystem takes it (a third of the CPU "
                "per GiB: no page-cache copy; the engine then reads its weights from the disk); "
                "false: through the page cache"),
        Setting("--share-compile-cache", "AGENT_SHARE_COMPILE_CACHE", "true", boolean,
                "publish vLLM compile caches beside the checkpoint and use the ones other agents "
                "published (compiled code: share only between agents that trust each other and the"
                " store); false: each agent keeps its own"),
    ),
    *_section(
        "The simulated engine (--engine sim)",
        Setting("--sim-load-seconds", "AGENT_SIM_LOAD_SECONDS", str(_SIM.load_seconds), float,
                "load time"),
        Setting("--sim-ttft-ms", "AGENT_SIM_TTFT_MS", str(_SIM.ttft_ms), float,
                "time to first token"),
        Setting("--sim-tpot-ms", "AGENT_SIM_TPOT_MS", str(_SIM.tpot_ms), float,
                "time per output token"),
        Setting("--sim-wake-seconds", "AGENT_SIM_WAKE_SECONDS", str(_SIM.wake_seconds), float,
                "wake time"),
        Setting("--sim-max-num-seqs", "AGENT_SIM_MAX_NUM_SEQS", str(_SIM.max_num_seqs), int,
                "concurrent requests"),
        Setting("--sim-stop-seconds", "AGENT_SIM_STOP_SECONDS", str(_SIM.stop_seconds), float,
                "time to stop (a real engine takes seconds)"),
        Setting(
            "--sim-block-tokens", "AGENT_SIM_BLOCK_TOKENS",
            str(_SIM.block_tokens), at_least(1, int),
            "prompt tokens per KV block (vLLM's --block-size)",
        ),
        Setting(
            "--sim-cache-blocks", "AGENT_SIM_CACHE_BLOCKS",
            str(_SIM.cache_blocks), at_least(0, int),
            "prefix-cache capacity, in KV blocks of --sim-block-tokens tokens",
        ),
        Setting(
            "--sim-prefill-ms-per-token", "AGENT_SIM_PREFILL_MS_PER_TOKEN",
            str(_SIM.prefill_ms_per_token), float,
            "prefill time per prompt token not in its prefix cache",
        ),
        Setting("--sim-request-log", "AGENT_SIM_REQUEST_LOG", _SIM.request_log, str,
                "append each request it takes (model, prompt) to this file"),
    ),
    *_section(
        "Traces (OpenTelemetry)",
        Setting("--otlp-endpoint", "OTEL_EXPORTER_OTLP_ENDPOINT", "", str,
                "collector for this agent's spans and its engines', over OTLP/HTTP "
                "(`/v1/traces` is added; empty: tracing is off, at no cost)"),
        Setting("--otlp-traces-endpoint", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "", str,
                "the traces endpoint itself, where it is not --otlp-endpoint's /v1/traces"),
        Setting("--trace-sample-percent", "AGENT_TRACE_SAMPLE_PERCENT", "100",
                float_between(0, 100),
                "percent of new traces kept: requests that come with a traceparent (the "
                "gateway's) follow their caller's decision"),
    ),
    *_section(
        "Process",
        Setting("--event-loop", "AGENT_EVENT_LOOP", "uvloop", str,
                "the agent's event loop: uvloop (libuv, in C: less CPU per relayed chunk, "
                "bench/README.md) or Python's own asyncio loop", choices=("uvloop", "asyncio")),
        Setting(
            "--log-level", "AGENT_LOG_LEVEL", "INFO", str,
            "log level", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        ),
    ),
)  # fmt: skip


class _EnvDefault(argparse.Action):
    """A flag whose default comes from an environment variable, named in --help."""

    def __init__(self, env: str, environ: Mapping[str, str], **kwargs: object) -> None:
        default = environ.get(env, kwargs.pop("default", None))
        help_text = str(kwargs.pop("help", ""))
        shown = (
            f" (env {env}; default: %(default)s)" if default not in (None, "") else f" (env {env})"
        )
        super().__init__(default=default, help=help_text + shown, **kwargs)  # type: ignore[arg-type]

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: object,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, values)


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nodeagent",
        description="llmfleet's node agent: downloads checkpoints, runs engines and proxies "
        "inference on one GPU host. Every flag can also be set by the environment variable "
        "named beside it.",
    )
    for setting in SETTINGS:
        # A string default goes through `type` as a flag's text would: the environment's value
        # and the declared default are checked and converted alike.
        parser.add_argument(
            setting.flag, action=_EnvDefault, env=setting.env, environ=environ,
            default=setting.default, type=setting.parse, choices=setting.choices or None,
            help=("sim engine: " if setting.flag.startswith("--sim-") else "") + setting.help,
            dest=setting.dest, metavar=setting.flag.removeprefix("--").replace("-", "_").upper(),
        )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"llmfleet nodeagent {__version__}")
    return parser


def _read_token(value: str | None, path: str | None) -> str:
    if value and path:
        raise SystemExit("nodeagent: set AGENT_TOKEN or AGENT_TOKEN_FILE (--token-file), not both")
    if path:
        try:
            return Path(path).read_text().strip()
        except OSError as exc:
            raise SystemExit(
                f"nodeagent: cannot read the agent token from {path}: {exc.strerror}"
            ) from None
    if not value:
        raise SystemExit(
            "nodeagent: the agent token is required (--token, AGENT_TOKEN or AGENT_TOKEN_FILE)"
        )
    return value.strip()


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Settings from `argv` (flags win) and `environ`; exits with a message on a bad value."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    parsed = vars(parser.parse_args(argv))
    # argparse checks `choices` on flags only, not on defaults taken from the environment.
    for setting in SETTINGS:
        if setting.choices and parsed[setting.dest] not in setting.choices:
            parser.error(
                f"{setting.env} must be one of {', '.join(setting.choices)}, "
                f"not {parsed[setting.dest]!r}"
            )
    sim_fields = {field.name for field in fields(SimSettings)}
    sim = SimSettings(**{name: parsed.pop(f"sim_{name}") for name in sim_fields})
    host = parsed["host"]
    reachable_host = socket.gethostname() if host in {"0.0.0.0", "::", ""} else host  # noqa: S104
    parsed["advertise_url"] = (
        parsed["advertise_url"] or f"http://{reachable_host}:{parsed['port']}"
    ).rstrip("/")
    parsed["agent_id"] = parsed["agent_id"] or socket.gethostname()
    parsed["token"] = _read_token(parsed["token"], parsed.pop("token_file"))
    parsed["control_plane_url"] = parsed["control_plane_url"].rstrip("/")
    return AgentConfig(sim=sim, **parsed)
