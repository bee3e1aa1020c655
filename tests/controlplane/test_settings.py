"""Settings load in a fresh interpreter per case: they are read once, at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = (
    "import json, django; django.setup(); from django.conf import settings as s; "
    "print(json.dumps({'db': s.DATABASES['default']['ENGINE'], 'broker': s.CELERY_BROKER_URL, "
    "'layer': s.CHANNEL_LAYERS['default']['BACKEND'], 'hosts': s.ALLOWED_HOSTS, "
    "'agent_token': s.AGENT_TOKEN, 'var': str(s.VAR_DIR)}))"
)
CONFIG_VARS = ("DATABASE_URL", "REDIS_URL", "SECRET_KEY", "AGENT_TOKEN", "VAR_DIR", "DEBUG",
               "ALLOW_WITHOUT_REDIS")  # fmt: skip


def load_settings(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {key: value for key, value in os.environ.items() if key not in CONFIG_VARS}
    clean.update(
        {"VAR_DIR": str(tmp_path / "var"), "DJANGO_SETTINGS_MODULE": "controlplane.settings"}
    )
    clean.update(env)
    return subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env=clean,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_embedded_defaults_need_nothing_configured(tmp_path):
    result = load_settings(tmp_path)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["db"] == "django.db.backends.sqlite3"
    assert loaded["broker"].startswith("llmfleetfs://")
    assert loaded["layer"] == "controlplane.layers.SQLiteChannelLayer"
    # A generated agent token, kept where local agents can read it (AGENT_TOKEN_FILE).
    assert (tmp_path / "var" / "agent-token").read_text() == loaded["agent_token"]


def test_postgres_and_redis_when_configured(tmp_path):
    result = load_settings(
        tmp_path,
        DATABASE_URL="postgres://u@db.internal:5432/fleet",
        REDIS_URL="redis://cache.internal:6379/0",
        SECRET_KEY="k" * 50,
        AGENT_TOKEN="t",
        ALLOWED_HOSTS="fleet.example.com, 10.0.0.5",
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert loaded["db"] == "django.db.backends.postgresql"
    assert loaded["broker"] == "redis://cache.internal:6379/0"
    assert loaded["layer"] == "channels_redis.core.RedisChannelLayer"
    assert loaded["hosts"] == ["fleet.example.com", "10.0.0.5"]


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"DEBUG": "maybe"}, "DEBUG='maybe' is not a boolean"),
        ({"HEARTBEAT_INTERVAL_SECONDS": "0"}, "HEARTBEAT_INTERVAL_SECONDS=0 is below its minimum"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL='LOUD' is not a log level"),
        (
            {"AGENT_TOKEN_FILE": "/nonexistent/token"},
            "AGENT_TOKEN_FILE='/nonexistent/token' cannot be read",
        ),
        (
            {"DATABASE_URL": "postgres://u@h/db", "REDIS_URL": "redis://r", "SECRET_KEY": "k"},
            "AGENT_TOKEN (or AGENT_TOKEN_FILE) must be set",
        ),
        (
            {
                "DATABASE_URL": "nosuchdb://x",
                "REDIS_URL": "redis://r",
                "SECRET_KEY": "k",
                "AGENT_TOKEN": "t",
            },
            "DATABASE_URL is not a database URL",
        ),
        (
            {"DATABASE_URL": "postgres://u@h/db", "SECRET_KEY": "k", "AGENT_TOKEN": "t"},
            "DATABASE_URL is set but REDIS_URL is not",
        ),
    ],
)
def test_a_bad_variable_stops_start_up_naming_it(tmp_path, env, named):
    result = load_settings(tmp_path, **env)
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert named in result.stderr


def test_a_database_without_redis_runs_only_when_asked_to(tmp_path):
    configured = {"DATABASE_URL": "postgres://u@db.internal/fleet", "SECRET_KEY": "k" * 50,
                  "AGENT_TOKEN": "t"}  # fmt: skip
    refused = load_settings(tmp_path, **configured)
    assert refused.returncode != 0
    assert "REDIS_URL" in refused.stderr
    allowed = load_settings(tmp_path, **configured, ALLOW_WITHOUT_REDIS="true")
    assert allowed.returncode == 0, allowed.stderr
    assert json.loads(allowed.stdout)["broker"].startswith("llmfleetfs://")


def deploy_check(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`manage.py check --deploy` under a production configuration (no DEBUG, its own
    database, Redis and secrets), failing on any warning."""
    clean = {key: value for key, value in os.environ.items() if key not in CONFIG_VARS}
    clean.update(
        VAR_DIR=str(tmp_path / "var"), DATABASE_URL="postgres://u@db.internal:5432/fleet",
        REDIS_URL="redis://cache.internal:6379/0", SECRET_KEY="Kq8-x7Zp2_vN" * 5,
        AGENT_TOKEN="t" * 40, ALLOWED_HOSTS="fleet.example.com", **env,
    )  # fmt: skip
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_documented_production_settings_pass_the_deploy_check(tmp_path):
    """docs/deploying.md, "Deploying behind TLS": HTTPS=true behind a TLS-terminating proxy."""
    result = deploy_check(tmp_path, HTTPS="true")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


def test_without_https_the_deploy_check_says_what_is_missing(tmp_path):
    result = deploy_check(tmp_path)
    assert result.returncode != 0
    assert "SECURE_SSL_REDIRECT" in result.stderr + result.stdout


HTTPS_PROBE = (
    "import json, django; django.setup(); from django.core.management import call_command; "
    "call_command('migrate', verbosity=0); from django.test import Client; c = Client(); "
    "print(json.dumps({path: c.generic(method, path).status_code for method, path in ["
    "('GET', '/admin/'), ('POST', '/api/agents/register'), ('POST', '/api/agents/a/progress'),"
    " ('POST', '/api/agents/a/credential/confirm'), ('GET', '/healthz')]}))"
)


def test_behind_tls_people_are_redirected_and_agents_and_probes_are_not(tmp_path):
    """Agents follow no redirect: their calls must keep working over the cluster's HTTP."""
    clean = {key: value for key, value in os.environ.items() if key not in CONFIG_VARS}
    clean.update(VAR_DIR=str(tmp_path / "var"), DJANGO_SETTINGS_MODULE="controlplane.settings",
                 HTTPS="true", ALLOWED_HOSTS="testserver")  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", HTTPS_PROBE], cwd=ROOT, env=clean, capture_output=True,
        text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    statuses = json.loads(result.stdout.strip().splitlines()[-1])
    assert statuses.pop("/admin/") == 301
    assert all(status != 301 for status in statuses.values()), statuses
