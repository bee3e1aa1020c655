"""The control plane for real, on the tests' database: daphne, a Celery worker and beat."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
from django.db import connection

from tests.e2e.agent_process import ROOT, AgentProcess, running_agent
from tests.support import free_port, http_ok, wait_for

# Fast clocks, so the tests see heartbeats, verdicts and sweeps within seconds.
FAST = {
    "HEARTBEAT_INTERVAL_SECONDS": "1",
    "HEARTBEAT_TIMEOUT_SECONDS": "1",
    "HEARTBEAT_DEGRADED_AFTER": "1",
    "HEARTBEAT_OFFLINE_AFTER": "2",
    "EVICTION_INTERVAL_SECONDS": "1",
    "COLD_START_TIMEOUT_SECONDS": "180",
    "GATEWAY_CACHE_SECONDS": "0",
}


@dataclass
class ControlPlane:
    url: str
    logs: Path
    token: str

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def agent(
        self,
        stack: ExitStack,
        tmp_path: Path,
        agent_id: str,
        *args: str,
        extra_env: dict[str, str] | None = None,
    ) -> AgentProcess:
        """Start a node agent that registers with this control plane."""
        home = tmp_path / agent_id
        home.mkdir()
        return stack.enter_context(
            running_agent(
                home, "--agent-id", agent_id, "--control-plane-url", self.url, *args,
                token=self.token, extra_env=extra_env,
            )
        )  # fmt: skip


def database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@contextmanager
def running_control_plane(
    settings: Any, tmp_path: Path, **overrides: str
) -> Iterator[ControlPlane]:
    """Start web, worker and beat against the test database; stop all three at the end."""
    if settings.REDIS_URL:  # the tests' own Redis database: no queued tasks of earlier runs
        redis.Redis.from_url(settings.REDIS_URL).flushdb()
    logs = tmp_path / "control-plane"
    logs.mkdir()
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(), AGENT_TOKEN=settings.AGENT_TOKEN,
        SECRET_KEY="e2e-control-plane", VAR_DIR=str(tmp_path / "var"), **{**FAST, **overrides},
    )  # fmt: skip
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    celery = [sys.executable, "-m", "celery", "-A", "controlplane"]
    commands = {
        "web": [sys.executable, "-m", "daphne", "-b", "127.0.0.1", "-p", str(port),
                "controlplane.asgi:application"],
        # The production layout: heartbeats and sweeps never queue behind a load.
        "worker": [*celery, "worker", "--loglevel", "INFO", "--pool", "threads",
                   "--queues", "control", "--concurrency", "4", "--hostname", "control@%h"],
        "loader": [*celery, "worker", "--loglevel", "INFO", "--pool", "threads",
                   "--queues", "loads", "--concurrency", "32", "--hostname", "loads@%h"],
        "beat": [*celery, "beat", "--loglevel", "INFO", "--schedule",
                 str(tmp_path / "beat-schedule")],
    }  # fmt: skip
    children: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name, argv in commands.items():
            with (logs / f"{name}.log").open("wb") as log:
                children[name] = subprocess.Popen(
                    argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                    start_new_session=True,
                )  # fmt: skip

        wait_for(lambda: http_ok(f"{url}/healthz"), 30, "daphne")
        plane = ControlPlane(url, logs, settings.AGENT_TOKEN)
        wait_for(lambda: "ready." in plane.log("worker"), 60, "the Celery worker")
        wait_for(lambda: "ready." in plane.log("loader"), 60, "the Celery loads worker")
        yield plane
    finally:
        for child in children.values():
            child.terminate()
        for child in children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()
