"""The control plane's settings, declared once: each variable's default, bounds and what it
does, in the order and sections `.env.example` shows them.

`controlplane.env`'s readers take a variable's default and bounds from here (reading one that
is not declared is an error), and `controlplane.settingsdoc` writes `.env.example` and the
docs' settings page from here and from the node agent's own table (nodeagent.config). Django
is not imported: `make run`'s launcher reads its settings before Django is set up.
"""

from __future__ import annotations

from dataclasses import dataclass

Value = str | int | bool | tuple[str, ...]


@dataclass(frozen=True)
class Var:
    name: str
    default: Value = ""
    minimum: int | None = None
    choices: tuple[str, ...] = ()
    # Also read from the file named by NAME_FILE (Docker and Kubernetes secrets).
    secret: bool = False
    # What .env.example shows, where that is not the default (a deployment's typical value).
    example: str | None = None
    # Shown commented out in .env.example: setting it empty would be an error to its reader.
    commented: bool = False
    # What an unset variable means, where its default is empty (the docs show it).
    unset: str = ""


@dataclass(frozen=True)
class Group:
    """Variables explained together (one comment in .env.example, one row in the docs)."""

    help: str
    vars: tuple[Var, ...]


@dataclass(frozen=True)
class Section:
    title: str
    groups: tuple[Group, ...]
    # Who reads these: the control plane's own processes, the stores' cloud clients, or compose.
    read_by: str = "control plane"
    note: str = ""


def _group(help: str, *variables: Var) -> Group:
    return Group(help, variables)


SECTIONS: tuple[Section, ...] = (
    Section(
        "where state lives",
        groups=(
            _group("PostgreSQL URL, e.g. `postgres://user:pw@host:5432/llmfleet`",
                Var(
                    "DATABASE_URL",
                    example="postgres://llmfleet:password@127.0.0.1:5432/llmfleet",
                    unset="SQLite in VAR_DIR",
                ),
            ),
            _group("seconds to keep database connections (keep 0: Django opens one per request "
                   "thread of the site's handler)",
                Var("DATABASE_CONN_MAX_AGE", default=0, minimum=0),
            ),
            _group("Celery broker, Channels layer, checked by `/healthz`; required with "
                   "`DATABASE_URL`",
                Var(
                    "REDIS_URL",
                    example="redis://127.0.0.1:6379/0",
                    unset="file-backed broker and layer",
                ),
            ),
            _group("`true` lets `DATABASE_URL` run without `REDIS_URL` (one host)",
                Var("ALLOW_WITHOUT_REDIS", default=False),
            ),
            _group("local state of embedded runs",
                Var("VAR_DIR", example="./var", unset="./var"),
            ),
        ),
    ),
    Section(
        "secrets (each also as NAME_FILE=/path, for Docker and Kubernetes secrets)",
        groups=(
            _group("Django's signing key",
                Var(
                    "SECRET_KEY",
                    secret=True,
                    example="change-me-to-50-random-characters",
                    unset="generated on embedded runs",
                ),
            ),
            _group("the fleet's enrolment token: enrols an agent_id nobody holds",
                Var(
                    "AGENT_TOKEN",
                    secret=True,
                    example="change-me",
                    unset="generated on embedded runs",
                ),
            ),
            _group("the key agent credentials are derived from; changing it invalidates every "
                   "agent's credential",
                Var("AGENT_CREDENTIAL_KEY", secret=True, unset="SECRET_KEY"),
            ),
            _group("what Prometheus presents (`Authorization: Bearer`) to scrape `/metrics`; "
                   "unset, the enrolment token, which the agents' `/metrics` take too",
                Var("METRICS_TOKEN", secret=True, unset="AGENT_TOKEN"),
            ),
            _group("`false` refuses agents on loopback addresses",
                Var("AGENT_ALLOW_LOOPBACK", default=True),
            ),
            _group("`false` refuses agents on private addresses (10/8, 172.16/12, 192.168/16, "
                   "fc00::/7)",
                Var("AGENT_ALLOW_PRIVATE_NETWORKS", default=True),
            ),
        ),
    ),
    Section(
        "web",
        groups=(
            _group("host names the web process answers to",
                Var("ALLOWED_HOSTS", default=("localhost", "127.0.0.1", "[::1]")),
            ),
            _group("origins trusted for admin posts behind TLS",
                Var("CSRF_TRUSTED_ORIGINS", default=()),
            ),
            _group("clients reach the control plane over HTTPS, terminated by a proxy that sets "
                   "`X-Forwarded-Proto`: plain HTTP is redirected (but `/healthz`, `/metrics`), "
                   "cookies are HTTPS-only, HSTS is sent",
                Var("HTTPS", default=False),
            ),
            _group("with `HTTPS`: the HSTS header's lifetime and flags",
                Var("SECURE_HSTS_SECONDS", default=31_536_000, minimum=0),
                Var("SECURE_HSTS_INCLUDE_SUBDOMAINS", default=True),
                Var("SECURE_HSTS_PRELOAD", default=True),
            ),
            _group("serve `/static/` from the ASGI app",
                Var("SERVE_STATIC", default=True),
            ),
            _group("target of `collectstatic`",
                Var("STATIC_ROOT", unset="VAR_DIR/static"),
            ),
            _group("Django debug pages",
                Var("DEBUG", default=False),
            ),
            _group("log level of every process; at `INFO` Celery's line per task received, "
                   "succeeded and sent by beat (every few seconds: heartbeat polls, sweeps) and "
                   "the poll summaries are left out, loads, unloads, failures and agent state "
                   "changes stay; `DEBUG` shows them all",
                Var("LOG_LEVEL", default="INFO"),
            ),
        ),
    ),
    Section(
        "gateway (/v1)",
        groups=(
            _group("largest request body, on every path; larger ones get 413 before any of it is "
                   "read or stored",
                Var("GATEWAY_MAX_BODY_BYTES", default=4 * 1024 * 1024, minimum=1024),
            ),
            _group("largest `max_tokens` / `max_completion_tokens` accepted",
                Var("GATEWAY_MAX_TOKENS", default=32768, minimum=1),
            ),
            _group("`Retry-After` on 503 `model_not_ready`",
                Var("GATEWAY_RETRY_AFTER_SECONDS", default=5, minimum=1),
            ),
            _group("where `/v1/files` keeps files: an `azure://`, `s3://` or `gs://` prefix",
                Var("FILES_STORE", unset="VAR_DIR/files"),
            ),
            _group("largest file `/v1/files` takes; its upload's body may be this plus 1 MiB",
                Var("GATEWAY_FILES_MAX_BYTES", default=100 * 1024 * 1024, minimum=1024),
            ),
            _group("lines of one batch in flight at once; each engine lets in only what its "
                   "reserve leaves (the agent's `AGENT_BATCH_RESERVE_PERCENT`)",
                Var("BATCH_CONCURRENCY", default=64, minimum=1),
            ),
            _group("how long a batch has to finish (clients ask for `24h`); past it, lines not run"
                   " go to the error file as `batch_expired`",
                Var("BATCH_COMPLETION_WINDOW_SECONDS", default=86400, minimum=1),
            ),
            _group("for this share of its window, a batch loads a model only on idle capacity "
                   "(free GPU memory, or models idle for `BATCH_IDLE_EVICT_SECONDS`); after it, as"
                   " a request does",
                Var("BATCH_IDLE_WAIT_PERCENT", default=50, minimum=0),
            ),
            _group("how long a model must have been idle for a batch waiting for idle capacity to "
                   "step it down",
                Var("BATCH_IDLE_EVICT_SECONDS", default=300, minimum=0),
            ),
            _group("how long a batch's runner holds it unless renewed (every third of it); beat "
                   "resumes a batch whose hold lapsed every half of it",
                Var("BATCH_LEASE_SECONDS", default=30, minimum=3),
            ),
            _group("`max_tokens` written into a request that sets no cap (at most "
                   "`GATEWAY_MAX_TOKENS`); what a tokens-per-minute limit reserves for it",
                Var("GATEWAY_DEFAULT_MAX_TOKENS", default=4096, minimum=1),
            ),
            _group("hold requests past a model's seats in a fair queue; `false` sends every "
                   "request straight to an engine",
                Var("GATEWAY_ADMISSION", default=True),
            ),
            _group("a replica's seats: its engine's `max_num_seqs` times this / 100",
                Var("GATEWAY_SEATS_PERCENT", default=100, minimum=1),
            ),
            _group("seats of a replica whose agent does not report `max_num_seqs`",
                Var("GATEWAY_UNKNOWN_MAX_NUM_SEQS", default=256, minimum=1),
            ),
            _group("a model's last seats, kept for keys holding fewer requests than this",
                Var("GATEWAY_RESERVED_SEATS", default=1, minimum=0),
            ),
            _group("held requests per model per web process; past it 429 `queue_full`",
                Var("GATEWAY_QUEUE_MAX", default=1000, minimum=0),
            ),
            _group("held requests of one key per model per web process; past it 429 `queue_full`",
                Var("GATEWAY_QUEUE_MAX_PER_KEY", default=200, minimum=0),
            ),
            _group("requests held for a model's cold start per web process; past it 429 "
                   "`queue_full`",
                Var("GATEWAY_COLD_QUEUE_MAX", default=1000, minimum=0),
            ),
            _group("longest a request waits for a seat (`X-Queue-Timeout` may shorten it); past it"
                   " 503 `queue_timeout`",
                Var("GATEWAY_QUEUE_TIMEOUT_SECONDS", default=60, minimum=1),
            ),
            _group("web processes sharing the fleet: each admits its share of every model's "
                   "seats, holds prefixes against its share of each replica's, and bounds new "
                   "prefixes' homes by its own traffic only when it is the one (`cache_aware`)",
                Var("GATEWAY_WEB_PROCESSES", default=1, minimum=1),
            ),
            _group("how long a web process remembers API keys and models (READY replicas: at most "
                   "1 s); a revoked key or disabled model stops working within this (plus the one "
                   "lookup that finds it so: an entry past it is served while it is looked up "
                   "again, up to twice this); 0 reads the database every time",
                Var("GATEWAY_CACHE_SECONDS", default=5, minimum=0),
            ),
            _group("how often a web process writes the usage it gathered",
                Var("GATEWAY_USAGE_FLUSH_SECONDS", default=1, minimum=0),
            ),
            _group("usage and request-figure rows a web process keeps for the next flush while the"
                   " database is away; past it the oldest are dropped "
                   "(`llmfleet_usage_dropped_total`, a log line)",
                Var("GATEWAY_USAGE_BACKLOG", default=100_000, minimum=1),
            ),
            _group("a replica that sends no headers for a stream within this is stuck: the request"
                   " moves to the next replica",
                Var("GATEWAY_STREAM_HEADERS_TIMEOUT_SECONDS", default=30, minimum=1),
            ),
            _group("a stream that sends nothing for this long is given up (its agent cut off by "
                   "the network, a host gone dark): the client gets OpenAI's error event and is "
                   "charged for what was relayed",
                Var("GATEWAY_STREAM_IDLE_SECONDS", default=120, minimum=1),
            ),
            _group("where a warm request goes among a model's replicas: `cache_aware` (where its "
                   "prompt prefix was sent), `precise` (where the engines' KV events say its "
                   "blocks are), `session` (the `user`'s replica), `least_loaded`",
                Var(
                    "GATEWAY_ROUTING_POLICY",
                    default="cache_aware",
                    choices=("cache_aware", "precise", "least_loaded", "session"),
                ),
            ),
            _group("how much busier (load score) than the least loaded a replica holding a "
                   "request's prefix may be and still get it: this many, or this percent of "
                   "its engine's seats (`max_num_seqs`) where that is more",
                Var("GATEWAY_PREFIX_BALANCE", default=4, minimum=0),
                Var("GATEWAY_PREFIX_BALANCE_PERCENT", default=25, minimum=0),
            ),
            _group("a new prefix's home: the first replica in its rendezvous order whose "
                   "recent new prompt traffic (what its cache took in) is at most this "
                   "percent of the replicas' mean (consistent hashing with bounded loads; "
                   "under `precise`, or with one web process; 0: plain rendezvous; under 100 "
                   "counts as 100)",
                Var("GATEWAY_PREFIX_HOME_BOUND_PERCENT", default=100, minimum=0),
            ),
            _group("how much of a prompt cache-aware routing reads (its cost per request)",
                Var("GATEWAY_PREFIX_HASH_KIB", default=64, minimum=1),
            ),
            _group("each web process's index of where prefixes were sent, least recently used out",
                Var("GATEWAY_PREFIX_INDEX_MIB", default=8, minimum=1),
            ),
        ),
    ),
    Section(
        "fleet",
        groups=(
            _group("how often beat polls every agent's heartbeat (all at once)",
                Var("HEARTBEAT_INTERVAL_SECONDS", default=5, minimum=1),
            ),
            _group("how long one agent's heartbeat may take before it counts as missed",
                Var("HEARTBEAT_TIMEOUT_SECONDS", default=3, minimum=1),
            ),
            _group("missed heartbeats in a row before an agent is `DEGRADED` (no new traffic)",
                Var("HEARTBEAT_DEGRADED_AFTER", default=2, minimum=1),
            ),
            _group("missed heartbeats in a row before an agent is `OFFLINE`",
                Var("HEARTBEAT_OFFLINE_AFTER", default=4, minimum=1),
            ),
        ),
    ),
    Section(
        "lifecycle: cold starts, eviction, scale-out",
        groups=(
            _group("how long a request waits for a cold start before 503 with `Retry-After`; also "
                   "a load's limit",
                Var("COLD_START_TIMEOUT_SECONDS", default=600, minimum=1),
            ),
            _group("agents one cold start tries (a failed load moves to the next best agent)",
                Var("LOAD_ATTEMPTS", default=3, minimum=1),
            ),
            _group("how long an agent where a model failed to load is not tried for it again",
                Var("LOAD_RETRY_BACKOFF_SECONDS", default=60, minimum=0),
            ),
            _group("how often beat runs the eviction sweep",
                Var("EVICTION_INTERVAL_SECONDS", default=15, minimum=1),
            ),
            _group("finished load and unload events older than this are pruned (steps under way "
                   "never are)",
                Var("RETENTION_LOAD_EVENTS_DAYS", default=30, minimum=1),
            ),
            _group("per-minute request figures (the dashboard's charts) older than this are pruned",
                Var("RETENTION_REQUEST_MINUTES_DAYS", default=2, minimum=1),
            ),
            _group("daily usage rows per key and model older than this are pruned",
                Var("RETENTION_USAGE_DAYS", default=400, minimum=1),
            ),
            _group("how often beat prunes history past its retention",
                Var("PRUNE_INTERVAL_SECONDS", default=3600, minimum=60),
            ),
            _group("an agent with less free GPU memory than this share is under pressure: its "
                   "least recently used idle model steps down",
                Var("GPU_MEMORY_PRESSURE_PERCENT", default=5, minimum=0),
            ),
            _group("a replica whose load (in flight + 2 x engine queue) reaches this is "
                   "overloaded; when all are, another is loaded (up to `max_replicas`)",
                Var("SCALE_OUT_QUEUE_THRESHOLD", default=8, minimum=1),
            ),
        ),
    ),
    Section(
        "traces (OpenTelemetry; docs/operating.md: Traces)",
        groups=(
            _group("where every process sends its spans, over OTLP/HTTP (the collector's base URL: "
                   "`/v1/traces` is added; unset: tracing is off, at no cost); the exporter's "
                   "other `OTEL_EXPORTER_OTLP_*` variables (headers, timeout) apply as usual",
                Var("OTEL_EXPORTER_OTLP_ENDPOINT", example="http://127.0.0.1:4318", commented=True),
            ),
            _group("the traces endpoint itself, where it is not the base URL's `/v1/traces`",
                Var("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
            ),
            _group("percent of new traces kept (parent-based: a request whose `traceparent` "
                   "says sampled is always traced, one that says not sampled never is)",
                Var("TRACING_SAMPLE_PERCENT", default=100, minimum=0),
            ),
            _group("a trace in your trace UI, `{trace_id}` replaced: the dashboard's cold starts "
                   "link to theirs (e.g. `http://jaeger:16686/trace/{trace_id}`)",
                Var("TRACING_UI_URL"),
            ),
        ),
    ),
    Section(
        "`make run` (python -m controlplane.fleet)",
        groups=(
            _group("where the web process (`python -m controlplane.web`, `--host`/`--port` "
                   "override) listens",
                Var("WEB_HOST", default="127.0.0.1"),
                Var("WEB_PORT", default=8000, minimum=1),
            ),
            _group("how long a stopping web process lets its open requests and streams finish "
                   "before it cuts them",
                Var("WEB_DRAIN_SECONDS", default=20, minimum=0),
            ),
            _group("threads of the `loads` worker `make run` starts: loads and unloads under way "
                   "at once (each waits on its agent)",
                Var("CELERY_LOAD_CONCURRENCY", default=32, minimum=1),
            ),
            _group("the node agent `make run` starts: `vllm`, `sim` (simulated engine) or `none`",
                Var("FLEET_AGENT", default="vllm", choices=("vllm", "sim", "none")),
            ),
            _group("where that agent listens",
                Var("FLEET_AGENT_PORT", default=8100, minimum=1),
            ),
            _group("how often `make run` starts again a process that exits within a minute before "
                   "it stops the fleet",
                Var("FLEET_MAX_RESTARTS", default=5, minimum=0),
            ),
        ),
    ),
    # The node agent: nodeagent.config.SETTINGS (rendered here by controlplane.settingsdoc).
    Section(
        "model stores (publish, register_model, and agents reading their sources)",
        read_by="stores",
        note="Each is read by its own cloud's client: set those of the stores your models are in "
        "(the AWS and Google ones are commented out: an empty AWS_PROFILE or endpoint is an error "
        "to botocore).",
        groups=(
            _group("azure://: a connection string (Azurite: UseDevelopmentStorage=true works as it"
                   " is)...",
                Var("AZURE_STORAGE_CONNECTION_STRING"),
            ),
            _group("...or an account URL with a SAS token (read/list is enough for agents) or the "
                   "account key.",
                Var("AZURE_STORAGE_ACCOUNT_URL"),
                Var("AZURE_STORAGE_SAS_TOKEN"),
                Var("AZURE_STORAGE_KEY"),
            ),
            _group("The account's name, when the account URL does not show it.",
                Var("AZURE_STORAGE_ACCOUNT"),
            ),
            _group("s3://: botocore's chain: these keys, else a profile (AWS_PROFILE), else the "
                   "instance's role.",
                Var("AWS_ACCESS_KEY_ID", commented=True),
                Var("AWS_SECRET_ACCESS_KEY", commented=True),
                Var("AWS_SESSION_TOKEN", commented=True),
                Var("AWS_PROFILE", commented=True),
                Var("AWS_REGION", commented=True),
            ),
            _group("An S3-compatible store (MinIO, Ceph, R2): its endpoint, addressed path-style.",
                Var("AWS_ENDPOINT_URL_S3", commented=True),
            ),
            _group("gs://: a service-account key file, else Application Default Credentials "
                   "(gcloud, metadata).",
                Var("GOOGLE_APPLICATION_CREDENTIALS", commented=True),
                Var("GOOGLE_CLOUD_PROJECT", commented=True),
            ),
            _group("A GCS emulator instead of storage.googleapis.com (anonymous unless a key file "
                   "is set too).",
                Var("STORAGE_EMULATOR_HOST", commented=True),
            ),
        ),
    ),
    Section(
        "docker/compose.yaml",
        read_by="compose",
        groups=(
            _group("The compose stack's PostgreSQL password (it builds DATABASE_URL from it).",
                Var("POSTGRES_PASSWORD"),
            ),
            _group("Tag of the llmfleet images compose builds and runs.",
                Var("LLMFLEET_VERSION", example="latest"),
            ),
        ),
    ),
)  # fmt: skip

# Every variable by name; the readers' one lookup.
VARS: dict[str, Var] = {
    var.name: var for section in SECTIONS for group in section.groups for var in group.vars
}
