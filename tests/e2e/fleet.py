"""The control plane for real, on the tests' database: the web process (uvicorn,
`python -m controlplane.web`), a Celery worker and beat."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import redis
from django.conf import settings as django_settings
from django.db import connection

from agents import actions
from agents.choices import PlacementState
from agents.models import Agent, Model, Placement
from tests.e2e.agent_process import ROOT, AgentProcess, running_agent
from tests.support import free_port, http_ok, wait_for

# How a test scrapes the control plane's /metrics: as Prometheus does, with the token (the
# agent token, METRICS_TOKEN being unset).
SCRAPER = {"Authorization": f"Bearer {django_settings.AGENT_TOKEN}"}

# Fast clocks, so the tests see heartbeats, verdicts and sweeps within seconds.
FAST = {
    "HEARTBEAT_INTERVAL_SECONDS": "1",
    "HEARTBEAT_TIMEOUT_SECONDS": "1",
    "HEARTBEAT_DEGRADED_AFTER": "1",
    "HEARTBEAT_OFFLINE_AFTER": "2",
    "EVICTION_INTERVAL_SECONDS": "1",
    "COLD_START_TIMEOUT_SECONDS": "180",
    "GATEWAY_CACHE_SECONDS": "0",
    # A stopping web process lets its streams finish for this long: within stop()'s wait.
    "WEB_DRAIN_SECONDS": "5",
    # A batch whose runner died is resumed within seconds, not half a minute.
    "BATCH_LEASE_SECONDS": "6",
}


@dataclass
class ControlPlane:
    url: str
    logs: Path
    token: str
    commands: dict[str, list[str]] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    children: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    web_urls: list[str] = field(default_factory=list)

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def start(self, name: str, **env: str) -> None:
        """Start (or start again) one of the control plane's processes, with `env` over the
        plane's own; its log goes on."""
        with (self.logs / f"{name}.log").open("ab") as log:
            self.children[name] = subprocess.Popen(
                self.commands[name], cwd=ROOT, env={**self.env, **env}, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip

    def another_web(self, name: str, **env: str) -> str:
        """One more web process on this plane, with `env` over the plane's own (another
        routing policy, say); its URL."""
        port = free_port()
        self.commands[name] = web_command(port)
        self.start(name, **env)
        url = f"http://127.0.0.1:{port}"
        wait_for(partial(http_ok, f"{url}/healthz"), 30, f"the web process {name}")
        return url

    def kill(self, name: str, signum: int = signal.SIGKILL) -> None:
        """Signal a process's whole group (a worker's pool threads, the web process) and reap it."""
        child = self.children[name]
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signum)
        child.wait(timeout=30)

    def stop(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        for child in self.children.values():
            try:
                child.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(child.pid, signal.SIGKILL)
                child.wait()

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
        home.mkdir(exist_ok=True)
        return stack.enter_context(
            running_agent(
                home, "--agent-id", agent_id, "--control-plane-url", self.url, *args,
                token=self.token, extra_env=extra_env,
            )
        )  # fmt: skip


def registered(*agent_ids: str) -> list[Agent]:
    """The agents once each has registered itself."""
    wait_for(
        lambda: Agent.objects.filter(agent_id__in=agent_ids).count() == len(agent_ids),
        30,
        f"{', '.join(agent_ids)} to register",
    )
    return [Agent.objects.get(agent_id=agent_id) for agent_id in agent_ids]


def serving_on(model: Model, *agent_ids: str, seconds: float = 30) -> None:
    """The model READY on each agent, loaded the way an operator would. An operator's load
    is refused while its agent takes no new work: an agent whose heartbeat came late (a
    standby engine importing on a busy host) is DEGRADED until the next one, so each
    agent is waited for first."""
    for agent_id in agent_ids:
        agent = Agent.objects.filter(agent_id=agent_id)
        wait_for(lambda: agent.get().is_routable, seconds, f"{agent_id} to take work")  # noqa: B023
        actions.load_on_agent(model, Agent.objects.get(agent_id=agent_id))
    wait_for(
        lambda: (
            Placement.objects.filter(model=model, state=PlacementState.READY).count()
            == len(agent_ids)
        ),
        seconds,
        f"{model.model_id} READY on {', '.join(agent_ids)}",
    )


def web_command(port: int) -> list[str]:
    """A web process as `make run` serves it, on loopback at `port`."""
    return [sys.executable, "-m", "controlplane.web", "--host", "127.0.0.1", "--port", str(port)]


def database_url() -> str:
    db = connection.settings_dict
    return f"postgres://{db['USER']}@{db['HOST']}:{db['PORT']}/{db['NAME']}"


@contextmanager
def running_control_plane(
    settings: Any, tmp_path: Path, web_replicas: int = 1, **overrides: str
) -> Iterator[ControlPlane]:
    """Start web (`web_replicas` processes, as `make run` serves it), both workers and beat
    against the test database; stop them all at the end."""
    redis_url = overrides.get("REDIS_URL", settings.REDIS_URL)
    if redis_url:  # the tests' own Redis database: no queued tasks of earlier runs
        redis.Redis.from_url(redis_url).flushdb()
    logs = tmp_path / "control-plane"
    logs.mkdir()
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url(), AGENT_TOKEN=settings.AGENT_TOKEN,
        AGENT_CREDENTIAL_KEY=settings.AGENT_CREDENTIAL_KEY, SECRET_KEY="e2e-control-plane",
        VAR_DIR=str(tmp_path / "var"), **{**FAST, **overrides},
        # The tests without a Redis of their own run the file broker (one host): say so.
        **({} if redis_url else {"ALLOW_WITHOUT_REDIS": "true"}),
    )  # fmt: skip
    ports = [free_port() for _ in range(web_replicas)]
    url = f"http://127.0.0.1:{ports[0]}"
    celery = [sys.executable, "-m", "celery", "-A", "controlplane"]
    webs = {("web" if n == 0 else f"web{n + 1}"): web_command(port) for n, port in enumerate(ports)}
    commands = {
        **webs,
        # The production layout: heartbeats and sweeps never queue behind a load.
        "worker": [*celery, "worker", "--loglevel", "INFO", "--pool", "threads",
                   "--queues", "control", "--concurrency", "4", "--hostname", "control@%h"],
        "loader": [*celery, "worker", "--loglevel", "INFO", "--pool", "threads",
                   "--queues", "loads", "--concurrency", "32", "--hostname", "loads@%h"],
        "batcher": [*celery, "worker", "--loglevel", "INFO", "--pool", "threads",
                    "--queues", "batches", "--concurrency", "4", "--hostname", "batches@%h"],
        "beat": [*celery, "beat", "--loglevel", "INFO", "--schedule",
                 str(tmp_path / "beat-schedule")],
    }  # fmt: skip
    plane = ControlPlane(
        url, logs, settings.AGENT_TOKEN, commands, env,
        web_urls=[f"http://127.0.0.1:{port}" for port in ports],
    )  # fmt: skip
    try:
        for name in commands:
            plane.start(name)
        for web_url in plane.web_urls:
            wait_for(partial(http_ok, f"{web_url}/healthz"), 30, "the web process")
        wait_for(lambda: "ready." in plane.log("worker"), 60, "the Celery worker")
        wait_for(lambda: "ready." in plane.log("loader"), 60, "the Celery loads worker")
        yield plane
    finally:
        plane.stop()
