"""The node agent's settings: each one a command-line flag with an environment fallback."""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent import __version__
from nodeagent.engines.identity import EngineUser
from nodeagent.protocol import ENGINES


@dataclass(frozen=True)
class SimSettings:
    """Timings of the simulated engine."""

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
    agent_id: str
    host: str
    port: int
    advertise_url: str
    token: str
    cache_dir: Path
    control_plane_url: str
    engine: str
    engine_python: str
    gpu_memory_share: float
    load_timeout: float
    stop_grace: float
    drain_seconds: float
    labels: dict[str, str]
    cache_max_bytes: int
    download_concurrency: int
    download_range_bytes: int
    download_limit_bytes_per_s: float
    sim: SimSettings
    log_level: str
    credential_file: Path | None = None
    event_loop: str = "uvloop"
    download_direct_io: bool = True
    # Standby engines kept ready (None: one per GPU on a GPU host, one on a CPU host, none
    # when the default engine is sim); 0 starts every engine plainly.
    standby_engines: int | None = None
    standby_fork_children: bool = True
    # Publish compile caches to the store and take other agents' (False: this agent's own only).
    share_compile_cache: bool = True
    # Seconds a source may keep failing a download before the model's next source takes over.
    source_failover_seconds: float = 20.0
    # Whether a model whose catalog entry sets trust_remote_code may run its checkpoint's own
    # Python here (the host's operator decides, beside the control plane's permission).
    allow_remote_code: bool = False
    # Engines publish their KV-cache events; the agent follows them (nodeagent.kvevents).
    kv_events: bool = True
    # Engines run as this user (name or uid; "": the agent's own), with the variables of the
    # agent's environment named here on top of the minimal one (nodeagent.engines.identity).
    engine_user: str = ""
    engine_env: tuple[str, ...] = ()
    # Batch-class requests enter an engine only while this share of its max_num_seqs stays
    # free for others, and wait at most this long for that (nodeagent.batchgate).
    batch_reserve_percent: float = 10.0
    batch_wait_seconds: float = 20.0

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
    def models_dir(self) -> Path:
        return self.cache_dir / "models"

    @property
    def logs_dir(self) -> Path:
        return self.cache_dir / "logs"


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


def _float_between(low: float, high: float) -> type[float]:
    def parse(value: str) -> float:
        number = float(value)
        if not low <= number <= high:
            raise argparse.ArgumentTypeError(f"{value} is not between {low} and {high}")
        return number

    return parse  # type: ignore[return-value]


def parse_labels(value: str) -> dict[str, str]:
    """`zone=eu-1a,cloud=aws` as a dict (ArgumentTypeError naming an item that is not
    key=value): an agent's --labels, and a source's in register_model."""
    labels = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, label = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"labels are key=value pairs, not {item!r}")
        labels[key.strip()] = label.strip()
    return labels


_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _bytes(value: str) -> int:
    """`500G`, `1.5T`, `512M` or a plain number of bytes."""
    text = value.strip().upper().removesuffix("IB").removesuffix("B")
    unit = text[-1:] if text[-1:] in _UNITS else ""
    try:
        number = float(text[: len(text) - len(unit)] if unit else text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a size like 500G or 512M") from None
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is negative")
    return int(number * _UNITS[unit])


def _positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value} is not a positive integer")
    return number


def _count_or_auto(value: str) -> int | None:
    if str(value).strip().lower() in {"", "auto"}:
        return None
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"{value} is not auto or a count of 0 or more")
    return number


def _boolean(value: str) -> bool:
    text = str(value).strip().lower()
    if text in {"1", "true", "yes", "on"}:
        return True
    if text in {"0", "false", "no", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not true or false")


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


def build_parser(environ: Mapping[str, str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nodeagent",
        description="llmfleet's node agent: downloads checkpoints, runs engines and proxies "
        "inference on one GPU host. Every flag can also be set by the environment variable "
        "named beside it.",
    )

    def flag(name: str, env: str, **kwargs: object) -> None:
        parser.add_argument(name, action=_EnvDefault, env=env, environ=environ, **kwargs)  # type: ignore[arg-type]

    flag(
        "--agent-id",
        "AGENT_ID",
        default=socket.gethostname(),
        help="this agent's unique name in the fleet",
    )
    flag("--host", "AGENT_HOST", default="127.0.0.1", help="address to listen on")
    flag("--port", "AGENT_PORT", type=int, default=8100, help="port to listen on")
    flag(
        "--advertise-url",
        "AGENT_ADVERTISE_URL",
        default="",
        help="URL the control plane and clients use to reach this agent (default: http://HOST:PORT)",
    )
    flag(
        "--token",
        "AGENT_TOKEN",
        default="",
        help="the fleet's enrolment token: presented once, to get this agent's own credential "
        "(without --control-plane-url: the one token the agent's API takes)",
    )
    flag(
        "--token-file",
        "AGENT_TOKEN_FILE",
        default="",
        help="file holding the token, instead of --token",
    )
    flag(
        "--credential-file",
        "AGENT_CREDENTIAL_FILE",
        default="",
        help="where the credential issued at enrolment is kept "
        "(default: CACHE_DIR/agent-credential)",
    )
    flag(
        "--cache-dir",
        "AGENT_CACHE_DIR",
        default=str(Path.home() / ".cache" / "llmfleet"),
        help="local (NVMe) directory for model files and engine logs",
    )
    flag(
        "--control-plane-url",
        "CONTROL_PLANE_URL",
        default="",
        help="control plane to register with, e.g. http://fleet:8000 (none: serve unregistered)",
    )
    flag(
        "--engine",
        "AGENT_ENGINE",
        choices=ENGINES,
        default="vllm",
        help="default engine for models",
    )
    flag(
        "--engine-python",
        "AGENT_ENGINE_PYTHON",
        default="python3",
        help="interpreter of the virtual environment that has vLLM (make builds .venv-engine)",
    )
    flag(
        "--gpu-memory-share",
        "AGENT_GPU_MEMORY_SHARE",
        type=_float_between(0.05, 1.0),
        default=0.9,
        help="share of GPU memory one model's engine may take (vLLM --gpu-memory-utilization)",
    )
    flag(
        "--load-timeout",
        "AGENT_LOAD_TIMEOUT",
        type=float,
        default=900.0,
        help="seconds a load may take",
    )
    flag(
        "--source-failover",
        "AGENT_SOURCE_FAILOVER_SECONDS",
        type=float,
        default=20.0,
        help="seconds a model's source may keep failing a download before its next source "
        "(a mirror in another store) takes over",
    )
    flag(
        "--stop-grace",
        "AGENT_STOP_GRACE",
        type=float,
        default=15.0,
        help="seconds between SIGTERM and SIGKILL",
    )
    flag(
        "--drain-seconds",
        "AGENT_DRAIN_SECONDS",
        type=float,
        default=30.0,
        help="on SIGTERM, seconds in-flight requests may take to finish before engines stop",
    )
    flag(
        "--labels",
        "AGENT_LABELS",
        type=parse_labels,
        default={},
        help="labels for scheduling, e.g. zone=eu-1a,tier=a",
    )
    flag(
        "--cache-max-bytes",
        "AGENT_CACHE_MAX_BYTES",
        type=_bytes,
        default="0",
        help="largest size of the model cache, e.g. 500G; unused models are deleted least "
        "recently used first to make room (0: only the disk's free space limits it)",
    )
    flag(
        "--download-concurrency",
        "AGENT_DOWNLOAD_CONCURRENCY",
        type=_positive_int,
        default=8,
        help="range reads in flight per download",
    )
    flag(
        "--download-range-mib",
        "AGENT_DOWNLOAD_RANGE_MIB",
        type=_positive_int,
        default=16,
        help="size of each range read, MiB",
    )
    flag(
        "--download-limit-mb-s",
        "AGENT_DOWNLOAD_LIMIT_MB_S",
        type=float,
        default=0.0,
        help="cap on download bandwidth, MB/s (0: none)",
    )
    flag(
        "--download-direct-io",
        "AGENT_DOWNLOAD_DIRECT_IO",
        default="true",
        help="write downloads with O_DIRECT where the filesystem takes it (a third of the CPU "
        "per GiB: no page-cache copy; the engine then reads its weights from the disk); "
        "false: through the page cache",
    )
    flag(
        "--standby-engines",
        "AGENT_STANDBY_ENGINES",
        default="auto",
        help="vLLM processes kept ready with everything imported, each becoming the engine of "
        "the next model to load (seconds instead of half a minute); auto: one per GPU, one on a "
        "CPU host, none if --engine is sim; 0: every engine starts plainly",
    )
    flag(
        "--standby-fork-children",
        "AGENT_STANDBY_FORK_CHILDREN",
        default="true",
        help="let a standby fork vLLM's EngineCore and worker (they inherit its imports) instead "
        "of spawning them, where nothing has initialized CUDA; false: spawn, as vLLM does",
    )
    flag(
        "--share-compile-cache",
        "AGENT_SHARE_COMPILE_CACHE",
        default="true",
        help="publish vLLM compile caches beside the checkpoint and use the ones other agents "
        "published (compiled code: share only between agents that trust each other and the "
        "store); false: each agent keeps its own",
    )
    flag(
        "--engine-user",
        "AGENT_ENGINE_USER",
        default="",
        help="run engines (and standbys) as this user, name or uid, so that code in an engine "
        "cannot read the agent's credential file or environment; needs the agent to run as "
        "root, and the cache directory readable by that user (default: the agent's own user)",
    )
    flag(
        "--engine-env",
        "AGENT_ENGINE_ENV",
        default="",
        help="names of more variables of the agent's environment that engines get, comma "
        "separated (engines get a minimal environment: PATH, locale, and how this host runs "
        "vLLM: VLLM_*, CUDA_*, NCCL_*, OMP_*, HF_*...; never one whose name says secret)",
    )
    flag(
        "--allow-remote-code",
        "AGENT_ALLOW_REMOTE_CODE",
        default="false",
        help="run a checkpoint's own Python code (vLLM's --trust-remote-code) for models whose "
        "catalog entry sets trust_remote_code; false: such loads are refused on this host",
    )
    flag(
        "--kv-events",
        "AGENT_KV_EVENTS",
        default="true",
        help="have each engine publish its KV-cache events (vLLM's --kv-events-config) and "
        "serve the blocks it holds at GET /models/{model}/kv, for the gateway's precise routing",
    )
    flag(
        "--batch-reserve-percent",
        "AGENT_BATCH_RESERVE_PERCENT",
        type=_float_between(0, 90),
        default=10.0,
        help="requests of the gateway's batch class (Batch API lines) enter an engine only "
        "while this percent of its max_num_seqs (at least one seat) stays free for others",
    )
    flag(
        "--batch-wait-seconds",
        "AGENT_BATCH_WAIT_SECONDS",
        type=float,
        default=20.0,
        help="how long a batch-class request waits here for room on its engine before the "
        "agent answers 503 engine_busy (keep it under the gateway's "
        "GATEWAY_STREAM_HEADERS_TIMEOUT_SECONDS)",
    )
    flag(
        "--sim-load-seconds",
        "AGENT_SIM_LOAD_SECONDS",
        type=float,
        default=2.0,
        help="sim engine: load time",
    )
    flag(
        "--sim-ttft-ms",
        "AGENT_SIM_TTFT_MS",
        type=float,
        default=20.0,
        help="sim engine: time to first token",
    )
    flag(
        "--sim-tpot-ms",
        "AGENT_SIM_TPOT_MS",
        type=float,
        default=5.0,
        help="sim engine: time per output token",
    )
    flag(
        "--sim-wake-seconds",
        "AGENT_SIM_WAKE_SECONDS",
        type=float,
        default=0.5,
        help="sim engine: wake time",
    )
    flag(
        "--sim-cache-blocks",
        "AGENT_SIM_CACHE_BLOCKS",
        type=int,
        default=4096,
        help="sim engine: prefix-cache capacity, in KV blocks of --sim-block-tokens tokens",
    )
    flag(
        "--sim-block-tokens",
        "AGENT_SIM_BLOCK_TOKENS",
        type=int,
        default=16,
        help="sim engine: prompt tokens per KV block (vLLM's --block-size)",
    )
    flag(
        "--sim-prefill-ms-per-token",
        "AGENT_SIM_PREFILL_MS_PER_TOKEN",
        type=float,
        default=0.0,
        help="sim engine: prefill time per prompt token not in its prefix cache",
    )
    flag(
        "--sim-stop-seconds",
        "AGENT_SIM_STOP_SECONDS",
        type=float,
        default=0.0,
        help="sim engine: time to stop (a real engine takes seconds)",
    )
    flag(
        "--sim-request-log",
        "AGENT_SIM_REQUEST_LOG",
        default="",
        help="sim engine: append each request it takes (model, prompt) to this file",
    )
    flag(
        "--sim-max-num-seqs",
        "AGENT_SIM_MAX_NUM_SEQS",
        type=int,
        default=8,
        help="sim engine: concurrent requests",
    )
    flag(
        "--event-loop",
        "AGENT_EVENT_LOOP",
        default="uvloop",
        choices=["uvloop", "asyncio"],
        help="the agent's event loop: uvloop (libuv, in C: less CPU per relayed chunk, "
        "bench/README.md) or Python's own asyncio loop",
    )
    flag(
        "--log-level",
        "AGENT_LOG_LEVEL",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log level",
    )
    parser.add_argument("--version", action="version", version=f"llmfleet nodeagent {__version__}")
    return parser


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> AgentConfig:
    """Settings from `argv` (flags win) and `environ`; exits with a message on a bad value."""
    environ = os.environ if environ is None else environ
    parser = build_parser(environ)
    args = parser.parse_args(argv)
    # argparse checks `choices` on flags only, not on defaults taken from the environment.
    if args.engine not in ENGINES:
        parser.error(f"AGENT_ENGINE must be one of {', '.join(ENGINES)}, not {args.engine!r}")
    port = int(args.port)
    host = str(args.host)
    reachable_host = socket.gethostname() if host in {"0.0.0.0", "::", ""} else host  # noqa: S104
    advertise = (args.advertise_url or f"http://{reachable_host}:{port}").rstrip("/")
    labels = args.labels if isinstance(args.labels, dict) else parse_labels(str(args.labels))
    try:
        standby_engines = _count_or_auto(str(args.standby_engines))
        standby_fork_children = _boolean(str(args.standby_fork_children))
        share_compile_cache = _boolean(str(args.share_compile_cache))
        download_direct_io = _boolean(str(args.download_direct_io))
        allow_remote_code = _boolean(str(args.allow_remote_code))
        kv_events = _boolean(str(args.kv_events))
    except (argparse.ArgumentTypeError, ValueError) as exc:
        parser.error(
            "--standby-engines, --standby-fork-children, --share-compile-cache, "
            f"--download-direct-io, --allow-remote-code, --kv-events: {exc}"
        )
    try:
        EngineUser.lookup(str(args.engine_user))
    except ValueError as exc:
        parser.error(f"--engine-user: {exc}")
    engine_env = tuple(name.strip() for name in str(args.engine_env).split(",") if name.strip())
    return AgentConfig(
        agent_id=str(args.agent_id),
        host=host,
        port=port,
        advertise_url=advertise,
        token=_read_token(args.token, args.token_file),
        cache_dir=Path(args.cache_dir).expanduser().resolve(),
        control_plane_url=str(args.control_plane_url).rstrip("/"),
        engine=str(args.engine),
        engine_python=str(args.engine_python),
        gpu_memory_share=float(args.gpu_memory_share),
        load_timeout=float(args.load_timeout),
        source_failover_seconds=float(args.source_failover),
        stop_grace=float(args.stop_grace),
        drain_seconds=float(args.drain_seconds),
        labels=labels,
        cache_max_bytes=int(args.cache_max_bytes),
        download_concurrency=int(args.download_concurrency),
        download_range_bytes=int(args.download_range_mib) * 1024 * 1024,
        download_limit_bytes_per_s=float(args.download_limit_mb_s) * 1e6,
        download_direct_io=download_direct_io,
        sim=SimSettings(
            load_seconds=float(args.sim_load_seconds),
            ttft_ms=float(args.sim_ttft_ms),
            tpot_ms=float(args.sim_tpot_ms),
            wake_seconds=float(args.sim_wake_seconds),
            max_num_seqs=int(args.sim_max_num_seqs),
            stop_seconds=float(args.sim_stop_seconds),
            block_tokens=max(int(args.sim_block_tokens), 1),
            cache_blocks=max(int(args.sim_cache_blocks), 0),
            prefill_ms_per_token=float(args.sim_prefill_ms_per_token),
            request_log=str(args.sim_request_log),
        ),
        log_level=str(args.log_level),
        event_loop=str(args.event_loop),
        credential_file=Path(args.credential_file).expanduser() if args.credential_file else None,
        standby_engines=standby_engines,
        standby_fork_children=standby_fork_children,
        share_compile_cache=share_compile_cache,
        allow_remote_code=allow_remote_code,
        kv_events=kv_events,
        engine_user=str(args.engine_user),
        engine_env=engine_env,
        batch_reserve_percent=float(args.batch_reserve_percent),
        batch_wait_seconds=max(float(args.batch_wait_seconds), 0.1),
    )
