"""Django settings for llmfleet's control plane.

Every value comes from the environment through the typed readers in
`controlplane.env`, declared in `controlplane.envspec`. With nothing configured,
the embedded defaults run the whole control plane on one machine: SQLite in
`VAR_DIR`, a file-system Celery broker and a SQLite channel layer, so the
separate web, worker and beat processes still talk to each other.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import dj_database_url
import django_stubs_ext
from django.core.exceptions import ImproperlyConfigured

from controlplane import broker
from controlplane.env import (
    env_bool,
    env_choice,
    env_int,
    env_list,
    env_secret,
    env_str,
    local_secret,
)
from nodeagent.tracing import traces_endpoint

# Lets the code write `ModelAdmin[Agent]` for mypy at run time. DRF's classes are patched in
# AgentsConfig.ready(): importing DRF's views here would freeze its defaults (permission
# classes included) before REST_FRAMEWORK below is read.
django_stubs_ext.monkeypatch()

BASE_DIR = Path(__file__).resolve().parent.parent
VAR_DIR = Path(env_str("VAR_DIR") or BASE_DIR / "var").resolve()
# Beat's schedule and the embedded files store live here whatever the database: without the
# directory, beat dies at start (a PostgreSQL deployment whose VAR_DIR was never made).
with contextlib.suppress(OSError):  # read-only: whoever needs it says so when it writes
    VAR_DIR.mkdir(parents=True, exist_ok=True)

DEBUG = env_bool("DEBUG")
DATABASE_URL = env_str("DATABASE_URL")
REDIS_URL = env_str("REDIS_URL")
# A deployment with its own database but no Redis would fall back, silently, to the embedded
# file broker, SQLite channel layer and per-process rate limits: one machine's parts, which
# several web or worker processes on several hosts cannot share. Refused unless asked for.
ALLOW_WITHOUT_REDIS = env_bool("ALLOW_WITHOUT_REDIS")
if DATABASE_URL and not REDIS_URL and not ALLOW_WITHOUT_REDIS:
    raise ImproperlyConfigured(
        "DATABASE_URL is set but REDIS_URL is not: the broker, the channel layer and rate limits "
        "would fall back to this machine's files. Set REDIS_URL too (or ALLOW_WITHOUT_REDIS=true "
        "for a single-host deployment that means it)."
    )
# Embedded: one machine, nothing configured. Secrets may then be generated into VAR_DIR,
# which every local process shares; a real deployment must set them explicitly, or each
# web replica would invent a different one.
EMBEDDED = not DATABASE_URL


def _secret(name: str) -> str:
    value = env_secret(name)
    if value:
        return value
    if EMBEDDED or DEBUG:
        return local_secret(VAR_DIR / name.lower().replace("_", "-"))
    raise ImproperlyConfigured(f"{name} (or {name}_FILE) must be set when DATABASE_URL is set")


SECRET_KEY = _secret("SECRET_KEY")
# The fleet's enrolment token: an agent presents it once, to enrol an agent_id nobody holds,
# and gets its own credential back (docs/agents.md: Agent enrolment). Nothing else accepts it.
AGENT_TOKEN = _secret("AGENT_TOKEN")
# What Prometheus presents to scrape the control plane's /metrics (Bearer); unset: the
# enrolment token, which the agents' /metrics take too. Staff who may view agents need none.
METRICS_TOKEN = env_secret("METRICS_TOKEN")
# The key agent credentials are derived from (HMAC of agent_id and a per-agent nonce): the
# database holds neither a credential nor this key. Changing it invalidates every credential.
AGENT_CREDENTIAL_KEY = env_secret("AGENT_CREDENTIAL_KEY") or SECRET_KEY
# Where agents may live. Link-local and cloud metadata addresses are always refused (an agent
# URL the gateway posts prompts to must never reach 169.254.169.254); loopback and private
# ranges are allowed unless turned off here.
AGENT_ALLOW_LOOPBACK = env_bool("AGENT_ALLOW_LOOPBACK")
AGENT_ALLOW_PRIVATE_NETWORKS = env_bool("AGENT_ALLOW_PRIVATE_NETWORKS")
HEARTBEAT_INTERVAL_SECONDS = env_int("HEARTBEAT_INTERVAL_SECONDS")
# How long one agent's heartbeat may take before it counts as missed.
HEARTBEAT_TIMEOUT_SECONDS = env_int("HEARTBEAT_TIMEOUT_SECONDS")
# Missed heartbeats in a row before an agent is DEGRADED, then OFFLINE (no traffic either way).
HEARTBEAT_DEGRADED_AFTER = env_int("HEARTBEAT_DEGRADED_AFTER")
HEARTBEAT_OFFLINE_AFTER = env_int("HEARTBEAT_OFFLINE_AFTER")

# The serverless lifecycle: cold starts, the eviction ladder and scale-out.
# How long a request waits for a cold start before it gets 503 with Retry-After.
COLD_START_TIMEOUT_SECONDS = env_int("COLD_START_TIMEOUT_SECONDS")
# Agents one cold start tries before it gives up (a failed load moves to the next best).
LOAD_ATTEMPTS = env_int("LOAD_ATTEMPTS")
# An agent where a model failed to load is not tried for that model again for this long.
LOAD_RETRY_BACKOFF_SECONDS = env_int("LOAD_RETRY_BACKOFF_SECONDS")
# How often beat runs the eviction sweep.
EVICTION_INTERVAL_SECONDS = env_int("EVICTION_INTERVAL_SECONDS")

# History kept (beat prunes it hourly). Load events feed the dashboard's timeline and the
# admin; the counters /metrics reports and each agent's load estimates outlive them.
RETENTION_LOAD_EVENTS_DAYS = env_int("RETENTION_LOAD_EVENTS_DAYS")
# Per-minute request figures feed the dashboard's charts (the last hour).
RETENTION_REQUEST_MINUTES_DAYS = env_int("RETENTION_REQUEST_MINUTES_DAYS")
# Usage is kept per key, model and day: what billing and quotas read.
RETENTION_USAGE_DAYS = env_int("RETENTION_USAGE_DAYS")
PRUNE_INTERVAL_SECONDS = env_int("PRUNE_INTERVAL_SECONDS")
# An agent whose free GPU memory is under this percentage of its total is under pressure:
# the sweep steps its least recently used idle model down.
GPU_MEMORY_PRESSURE_PERCENT = env_int("GPU_MEMORY_PRESSURE_PERCENT")
# A replica whose load score (in-flight + 2 x engine queue) reaches this is overloaded:
# when all of a model's replicas are, another is loaded (up to the model's max_replicas).
SCALE_OUT_QUEUE_THRESHOLD = env_int("SCALE_OUT_QUEUE_THRESHOLD")

# The OpenAI-compatible gateway.
GATEWAY_MAX_BODY_BYTES = env_int("GATEWAY_MAX_BODY_BYTES")
GATEWAY_MAX_TOKENS = env_int("GATEWAY_MAX_TOKENS")
# /v1/files: where files are kept (an azure://, s3:// or gs:// prefix; empty: VAR_DIR/files,
# one host only) and the largest one taken (its upload's body may be this plus 1 MiB).
FILES_STORE = env_str("FILES_STORE")
GATEWAY_FILES_MAX_BYTES = env_int("GATEWAY_FILES_MAX_BYTES")
# /v1/batches: lines of one batch in flight at once (each engine lets in only what its
# reserve leaves: the agent's --batch-reserve-percent), and how long a batch has to finish
# (clients ask for OpenAI's "24h"; a shorter window is for tests).
BATCH_CONCURRENCY = env_int("BATCH_CONCURRENCY")
BATCH_COMPLETION_WINDOW_SECONDS = env_int("BATCH_COMPLETION_WINDOW_SECONDS")
# For the first BATCH_IDLE_WAIT_PERCENT of its window, a batch loads a model only on idle
# capacity: free GPU memory, or models idle for BATCH_IDLE_EVICT_SECONDS; after that, as any
# request does (its deadline needs it).
BATCH_IDLE_WAIT_PERCENT = min(env_int("BATCH_IDLE_WAIT_PERCENT"), 100)
BATCH_IDLE_EVICT_SECONDS = env_int("BATCH_IDLE_EVICT_SECONDS")
# How long a batch's runner holds it unless renewed (it renews a third of the way): a runner
# that dies is replaced within this and half as much again (beat looks every half).
BATCH_LEASE_SECONDS = env_int("BATCH_LEASE_SECONDS")
# What a request that sets no cap on its answer gets (at most GATEWAY_MAX_TOKENS): without one,
# vLLM generates to the end of the model's context.
GATEWAY_DEFAULT_MAX_TOKENS = env_int("GATEWAY_DEFAULT_MAX_TOKENS")
# Admission (docs/routing.md: admission): each READY replica takes its engine's max_num_seqs times
# GATEWAY_SEATS_PERCENT / 100 requests at once from a web process; the rest wait in the
# gateway, shared fairly across keys by weight, interactive before batch.
GATEWAY_ADMISSION = env_bool("GATEWAY_ADMISSION")
GATEWAY_SEATS_PERCENT = env_int("GATEWAY_SEATS_PERCENT")
# A replica whose agent does not say its engine's max_num_seqs (an older agent) is taken to
# have vLLM's default for a GPU API server.
GATEWAY_UNKNOWN_MAX_NUM_SEQS = env_int("GATEWAY_UNKNOWN_MAX_NUM_SEQS")
# The last seats of a model are kept for keys holding fewer requests than this: a key that
# asks now and then starts at once while another floods (one key alone uses all but these).
GATEWAY_RESERVED_SEATS = env_int("GATEWAY_RESERVED_SEATS")
# Held requests, past which a request is refused at once (429 queue_full, Retry-After).
GATEWAY_QUEUE_MAX = env_int("GATEWAY_QUEUE_MAX")
GATEWAY_QUEUE_MAX_PER_KEY = env_int("GATEWAY_QUEUE_MAX_PER_KEY")
GATEWAY_COLD_QUEUE_MAX = env_int("GATEWAY_COLD_QUEUE_MAX")
# How many web processes share the fleet's seats (each admits its share; docs/routing.md:
# admission).
GATEWAY_WEB_PROCESSES = env_int("GATEWAY_WEB_PROCESSES")
# The longest a request waits for a seat (a client's X-Queue-Timeout may shorten it): past
# it, 503 queue_timeout, and the engine never sees it.
GATEWAY_QUEUE_TIMEOUT_SECONDS = env_int("GATEWAY_QUEUE_TIMEOUT_SECONDS")
GATEWAY_RETRY_AFTER_SECONDS = env_int("GATEWAY_RETRY_AFTER_SECONDS")
# How long a web process remembers API keys and catalog models (0: ask the database every time).
GATEWAY_CACHE_SECONDS = env_int("GATEWAY_CACHE_SECONDS")
# How often a web process writes the usage it gathered (seconds).
GATEWAY_USAGE_FLUSH_SECONDS = env_int("GATEWAY_USAGE_FLUSH_SECONDS")
# Usage rows a web process keeps while the database is away, before it drops the oldest.
GATEWAY_USAGE_BACKLOG = env_int("GATEWAY_USAGE_BACKLOG")
# A stream's headers come as soon as the engine takes the request: a replica that sends none
# within this many seconds is stuck, and the request moves to the next one.
GATEWAY_STREAM_HEADERS_TIMEOUT_SECONDS = env_int("GATEWAY_STREAM_HEADERS_TIMEOUT_SECONDS")
# A stream that sends nothing for this long is given up: its agent is cut off (a network
# partition, a host gone dark) and the client gets OpenAI's error event, charged for what was
# relayed. Long enough for any prefill: the engine's first token comes before it.
GATEWAY_STREAM_IDLE_SECONDS = env_int("GATEWAY_STREAM_IDLE_SECONDS")
# Where a warm request goes among a model's READY replicas (docs/routing.md: routing policies):
# cache_aware, where its prompt's prefix was last sent, unless that replica is busier than the
# least loaded by more than GATEWAY_PREFIX_BALANCE; precise, the same rule by the blocks each
# engine says it holds (its KV events, through its agent), cache_aware where none says;
# least_loaded; session, the `user`'s own.
GATEWAY_ROUTING_POLICY = env_choice("GATEWAY_ROUTING_POLICY")
# How much busier (in load score: a request in flight 1, one queued in the engine 2) a replica
# holding a request's prefix may be than the least loaded one and still be chosen for it: this
# many, or this percent of its engine's seats (max_num_seqs) where that is more.
GATEWAY_PREFIX_BALANCE = env_int("GATEWAY_PREFIX_BALANCE")
GATEWAY_PREFIX_BALANCE_PERCENT = env_int("GATEWAY_PREFIX_BALANCE_PERCENT")
# A new prefix's home is the first replica, in its rendezvous order, whose recent new prompt
# traffic from this web process (chunks its index did not list for it) is at most this percent
# of the replicas' mean (0: plain rendezvous).
GATEWAY_PREFIX_HOME_BOUND_PERCENT = env_int("GATEWAY_PREFIX_HOME_BOUND_PERCENT")
# How much of a prompt is hashed for routing (KiB): a cap on each request's cost.
GATEWAY_PREFIX_HASH_KIB = env_int("GATEWAY_PREFIX_HASH_KIB")
# The memory each web process gives its prefix index (MiB), least recently used first out.
GATEWAY_PREFIX_INDEX_MIB = env_int("GATEWAY_PREFIX_INDEX_MIB")
# Django refuses larger bodies before a view sees them; the gateway answers 413 itself.
DATA_UPLOAD_MAX_MEMORY_SIZE = GATEWAY_MAX_BODY_BYTES

ALLOWED_HOSTS = env_list("ALLOWED_HOSTS")
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS")

# Clients reach the control plane over HTTPS, terminated by the load balancer or ingress in
# front, which says so in X-Forwarded-Proto (docs/deploying.md: Deploying behind TLS). Then
# the admin and the dashboard redirect plain HTTP to HTTPS, send HSTS and keep their cookies to
# HTTPS. What calls from inside the cluster keeps plain HTTP: probes and scrapers (/healthz,
# /metrics) and the node agents (registration, progress, credential confirmation), which follow
# no redirect.
HTTPS = env_bool("HTTPS")
if HTTPS:
    SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    SECURE_SSL_REDIRECT = True
    SECURE_REDIRECT_EXEMPT = [
        r"^healthz$",
        r"^metrics$",
        r"^api/agents/register$",
        r"^api/agents/[^/]+/(progress|credential/confirm)$",
    ]
    SESSION_COOKIE_SECURE = CSRF_COOKIE_SECURE = True
    SECURE_HSTS_SECONDS = env_int("SECURE_HSTS_SECONDS")
    SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("SECURE_HSTS_INCLUDE_SUBDOMAINS")
    SECURE_HSTS_PRELOAD = env_bool("SECURE_HSTS_PRELOAD")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "drf_spectacular",
    "channels",
    "django_prometheus",
    "agents",
    "controlplane.gateway",
]

MIDDLEWARE = [
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
]

ROOT_URLCONF = "controlplane.urls"
ASGI_APPLICATION = "controlplane.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]


def _database() -> dict[str, Any]:
    if DATABASE_URL:
        try:
            # 0 under ASGI: Django gives each request's ORM calls their own thread, and
            # persistent connections would pile up one per thread until PostgreSQL refuses.
            config = dj_database_url.parse(
                DATABASE_URL, conn_max_age=env_int("DATABASE_CONN_MAX_AGE")
            )
        except ValueError as exc:
            raise ImproperlyConfigured(f"DATABASE_URL is not a database URL: {exc}") from None
        return dict(config)
    VAR_DIR.mkdir(parents=True, exist_ok=True)
    return {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": VAR_DIR / "db.sqlite3",
        "OPTIONS": {
            # web, worker and beat write concurrently: WAL lets readers go on during a
            # write, IMMEDIATE takes the write lock up front instead of failing on upgrade.
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
            "transaction_mode": "IMMEDIATE",
            "timeout": 20,
        },
    }


DATABASES = {"default": _database()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
TIME_ZONE = "UTC"
USE_I18N = False
USE_TZ = True

STATIC_URL = "/static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT") or VAR_DIR / "static")
# daphne serves no files itself; the ASGI app serves /static/ unless a proxy in front does.
SERVE_STATIC = env_bool("SERVE_STATIC")

REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": [
        "rest_framework.authentication.SessionAuthentication",
        "rest_framework.authentication.BasicAuthentication",
    ],
    # Staff, and the Django model permission of each call (agents/api/permissions.py).
    "DEFAULT_PERMISSION_CLASSES": ["agents.api.permissions.FleetPermissions"],
    "DEFAULT_PAGINATION_CLASS": "rest_framework.pagination.LimitOffsetPagination",
    "PAGE_SIZE": 100,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
}

SPECTACULAR_SETTINGS = {
    "TITLE": "llmfleet fleet API",
    "DESCRIPTION": "Agents, the model catalog and placements; node agent registration.",
    "VERSION": "1",
    "SERVE_INCLUDE_SCHEMA": False,
    # One name per choice set, however many fields use it (state, reported_state; levels).
    "ENUM_NAME_OVERRIDES": {
        "AgentStateEnum": "agents.choices.AgentState",
        "PlacementStateEnum": "agents.choices.PlacementState",
        "CacheLevelEnum": "agents.choices.CacheLevel",
    },
}

# Celery: configured here, read by controlplane/celery.py with the CELERY_ namespace.
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_BROKER_TRANSPORT_OPTIONS: dict[str, Any] = {}
else:
    # kombu's file-system transport, made safe for several producers and consumers
    # (controlplane.broker: messages renamed into place whole, claimed by rename).
    BROKER_DIR = VAR_DIR / "broker"
    CELERY_BROKER_URL = f"{broker.SCHEME}://localhost/"
    CELERY_BROKER_TRANSPORT_OPTIONS = broker.transport_options(BROKER_DIR)
# Tasks write their outcome to fleet state; nobody waits on a Celery result.
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Two queues, each with its own workers: a load holds its worker thread while the engine
# starts (minutes), so heartbeat polls and sweeps, which must run on time whatever the loads
# in flight, never wait behind one. `control` is the default; `loads` takes the long calls.
CELERY_TASK_DEFAULT_QUEUE = "control"
CELERY_TASK_ROUTES = {
    "agents.tasks.load": {"queue": "loads"},
    "agents.tasks.unload": {"queue": "loads"},
    "agents.tasks.scale_out": {"queue": "loads"},
    "agents.tasks.unload_adapter": {"queue": "loads"},
    "agents.tasks.unload_orphan": {"queue": "loads"},
    # A batch holds its thread for its whole run: a queue and worker of its own.
    "gateway.tasks.run_batch": {"queue": "batches"},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")
CELERY_TIMEZONE = TIME_ZONE
# Beat's schedule. A run that would start after the next one is due is dropped (expires),
# so a slow poll never piles up behind itself.
CELERY_BEAT_SCHEDULE = {
    "poll-heartbeats": {
        "task": "agents.tasks.poll_heartbeats",
        "schedule": float(HEARTBEAT_INTERVAL_SECONDS),
        "options": {"expires": float(HEARTBEAT_INTERVAL_SECONDS)},
    },
    "sweep-eviction": {
        "task": "agents.tasks.sweep",
        "schedule": float(EVICTION_INTERVAL_SECONDS),
        "options": {"expires": float(EVICTION_INTERVAL_SECONDS)},
    },
    # Revocations an unreachable agent has not heard of: its old credential must reach nothing.
    "tell-revoked-agents": {
        "task": "agents.tasks.tell_revoked_agents",
        "schedule": 30.0,
        "options": {"expires": 30.0},
    },
    # Batches whose runner died: resumed from their journal.
    "resume-batches": {
        "task": "gateway.tasks.resume_batches",
        "schedule": BATCH_LEASE_SECONDS / 2,
        "options": {"expires": BATCH_LEASE_SECONDS / 2},
    },
    "prune-history": {
        "task": "agents.tasks.prune_history",
        "schedule": float(PRUNE_INTERVAL_SECONDS),
        "options": {"expires": float(PRUNE_INTERVAL_SECONDS)},
    },
    "prune-gateway-history": {
        "task": "gateway.tasks.prune_history",
        "schedule": float(PRUNE_INTERVAL_SECONDS),
        "options": {"expires": float(PRUNE_INTERVAL_SECONDS)},
    },
}

if REDIS_URL:
    CHANNEL_LAYERS: dict[str, Any] = {
        "default": {
            "BACKEND": "channels_redis.core.RedisChannelLayer",
            "CONFIG": {"hosts": [REDIS_URL]},
        }
    }
else:
    CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "controlplane.layers.SQLiteChannelLayer",
            "CONFIG": {"path": str(VAR_DIR / "channels.sqlite3")},
        }
    }

LOG_LEVEL = env_str("LOG_LEVEL").upper()
# Traces (nodeagent.tracing): on where an OTLP endpoint is set, by OpenTelemetry's own rule.
TRACING_ENDPOINT = traces_endpoint({
    "OTEL_EXPORTER_OTLP_ENDPOINT": env_str("OTEL_EXPORTER_OTLP_ENDPOINT"),
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": env_str("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
})  # fmt: skip
TRACING_SAMPLE_RATIO = min(env_int("TRACING_SAMPLE_PERCENT"), 100) / 100
TRACING_UI_URL = env_str("TRACING_UI_URL")
if LOG_LEVEL not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
    raise ImproperlyConfigured(f"LOG_LEVEL={LOG_LEVEL!r} is not a log level")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"plain": {"format": "%(asctime)s %(levelname)s %(name)s: %(message)s"}},
    "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "plain"}},
    "root": {"handlers": ["console"], "level": LOG_LEVEL},
    "loggers": {"django.db.backends": {"level": "INFO"}},
}
