"""`python -m controlplane.fleet` (what `make run` starts): the whole fleet on one machine.

Migrates the database, publishes and registers the tiny demo model (`manage.py
setup_demo`), then runs web (`python -m controlplane.web`), worker and beat (Celery) and one
node agent (vLLM, or the sim engine with FLEET_AGENT=sim, or none with FLEET_AGENT=none) as
child processes with their output prefixed by name. Once the agent has registered
it prints ready-to-paste curl and openai commands; the first cold-starts the model.
Ctrl-C or SIGTERM stops them all. A child that dies is started again, saying so; one
that keeps dying (FLEET_MAX_RESTARTS times within a minute) stops the whole fleet: a
half-running fleet is worse than a stopped one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

from django.core.exceptions import ImproperlyConfigured

from controlplane.env import env_choice, env_int, env_str

ROOT = Path(__file__).resolve().parent.parent
# Long enough for Celery's warm shutdown and the web process's drain (WEB_DRAIN_SECONDS, 20)
# before SIGKILL.
GRACE_SECONDS = 30.0
# The agent drains first (AGENT_DRAIN_SECONDS, 30), then stops its engines (AGENT_STOP_GRACE,
# 15): a SIGKILL before then would leave engines running in their own sessions.
AGENT_GRACE_SECONDS = 60.0
# A child that exits is started again, unless it did so this often within the window.
MAX_RESTARTS = 5
RESTART_WINDOW_SECONDS = 60.0
# Who stops first on Ctrl-C (docs/operating.md, "What each process does on SIGTERM"); the
# rest after.
STOP_ORDER = (("agent",), ("web",))
LOCAL_AGENT = "local-1"


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: Sequence[str]
    env: Mapping[str, str] | None = None
    grace: float = GRACE_SECONDS  # from SIGTERM to SIGKILL of its group


def process_specs(host: str, port: int, concurrency: int) -> list[ProcessSpec]:
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "controlplane"]
    web = [python, "-m", "controlplane.web", "--host", host, "--port", str(port)]
    # A worker per queue (settings.CELERY_TASK_ROUTES): heartbeat polls and sweeps run on time
    # however many loads hold their threads while engines start, and batches (each holding a
    # thread for its run) take none of either's.
    worker = [*celery, "worker", "--loglevel", "INFO", "--pool", "threads", "--queues", "control",
              "--concurrency", "4", "--hostname", "control@%h"]  # fmt: skip
    loader = [*celery, "worker", "--loglevel", "INFO", "--pool", "threads", "--queues", "loads",
              "--concurrency", str(concurrency), "--hostname", "loads@%h"]  # fmt: skip
    batcher = [*celery, "worker", "--loglevel", "INFO", "--pool", "threads", "--queues",
               "batches", "--concurrency", "8", "--hostname", "batches@%h"]  # fmt: skip
    beat = [*celery, "beat", "--loglevel", "INFO"]
    return [ProcessSpec("web", web), ProcessSpec("worker", worker),
            ProcessSpec("loader", loader), ProcessSpec("batcher", batcher),
            ProcessSpec("beat", beat)]  # fmt: skip


def agent_spec(
    kind: str, control_plane_url: str, port: int, var_dir: Path, token: str
) -> ProcessSpec:
    """One node agent on this machine, registering with the local control plane."""
    argv = [sys.executable, "-m", "nodeagent", "--agent-id", LOCAL_AGENT, "--port", str(port),
            "--control-plane-url", control_plane_url, "--cache-dir", str(var_dir / "agent-cache"),
            "--engine", kind]  # fmt: skip
    if kind == "vllm":
        engine_python = os.environ.get("AGENT_ENGINE_PYTHON") or str(
            ROOT / ".venv-engine" / "bin" / "python"
        )
        if not Path(engine_python).exists():
            raise SystemExit(
                f"fleet: vLLM's environment is missing ({engine_python}); `make run` builds it "
                "(or set FLEET_AGENT=sim for the simulated engine)"
            )
        argv += ["--engine-python", engine_python]
    standbys = os.environ.get("AGENT_STANDBY_ENGINES", "").strip()
    if standbys:  # e.g. 0 for plain starts only (bench/coldstart.py compares both)
        argv += ["--standby-engines", standbys]
    # The token goes by environment, never argv, which `ps` shows to every user.
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_")}
    env["AGENT_TOKEN"] = token
    return ProcessSpec("agent", argv, env, grace=AGENT_GRACE_SECONDS)


def _relay(name: str, stream: IO[bytes]) -> None:
    """Copy a child's output to ours, a line at a time, prefixed with its name."""
    prefix = f"{name:>6} | ".encode()
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()


class Supervisor:
    """Starts the children, starts again one that dies, and stops every one of them."""

    def __init__(
        self,
        specs: Sequence[ProcessSpec],
        max_restarts: int = MAX_RESTARTS,
        window: float = RESTART_WINDOW_SECONDS,
    ) -> None:
        self.specs = specs
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_requested = False
        self.max_restarts = max_restarts
        self.window = window
        self.restarts: dict[str, deque[float]] = {spec.name: deque() for spec in specs}

    def request_stop(self, signum: int, frame: object) -> None:
        # A signal handler only sets the flag; the main loop does the stopping.
        self.stop_requested = True

    def start(self) -> None:
        for spec in self.specs:
            self._spawn(spec)

    def _spawn(self, spec: ProcessSpec) -> None:
        # A session of its own: Ctrl-C reaches us alone, and we stop each child's group.
        child = subprocess.Popen(
            spec.argv,
            cwd=ROOT,
            env=None if spec.env is None else dict(spec.env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert child.stdout is not None
        threading.Thread(target=_relay, args=(spec.name, child.stdout), daemon=True).start()
        self.children[spec.name] = child

    def tend(self) -> int | None:
        """Start again each child that exited; the fleet's exit status when one keeps dying
        (more than `max_restarts` restarts within `window` seconds), else None."""
        now = time.monotonic()
        for spec in self.specs:
            child = self.children[spec.name]
            code = child.poll()
            if code is None:
                continue
            _signal_group(child, signal.SIGKILL)  # what is left of it (a Celery pool)
            recent = self.restarts[spec.name]
            while recent and now - recent[0] > self.window:
                recent.popleft()
            if len(recent) >= self.max_restarts:
                print(f"fleet: {spec.name} exited with status {code}, its {len(recent) + 1}th "
                      f"exit in {self.window:.0f} s: it keeps dying; stopping the rest",
                      flush=True)  # fmt: skip
                return code or 1
            recent.append(now)
            print(f"fleet: {spec.name} exited with status {code}; starting it again "
                  f"(restart {len(recent)} of {self.max_restarts} allowed in "
                  f"{self.window:.0f} s)", flush=True)  # fmt: skip
            self._spawn(spec)
        return None

    def watch(self) -> int:
        """Tend the children until a stop request or one keeps dying; the fleet's status."""
        while not self.stop_requested:
            if (code := self.tend()) is not None:
                return code
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        """Stop the children in STOP_ORDER: the agent drains while web still relays its
        streams, web goes before the workers that its requests may be waiting on."""
        names = list(self.children)
        for group in STOP_ORDER:
            self._stop([name for name in names if name in group])
        self._stop([name for name in names if not any(name in group for group in STOP_ORDER)])

    def _stop(self, names: list[str]) -> None:
        # SIGTERM to each leader alone: Celery's warm shutdown stops its own pool, which
        # a signal to the whole group would kill mid-task.
        children = {name: self.children[name] for name in names}
        for child in children.values():
            if child.poll() is None:
                child.terminate()
        grace = {spec.name: spec.grace for spec in self.specs}
        started = time.monotonic()
        for name, child in children.items():
            try:
                child.wait(timeout=max(started + grace[name] - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                print(
                    f"fleet: {name} ignored SIGTERM for {grace[name]:.0f} s; killing it",
                    flush=True,
                )
            # Kill whatever is left of the group, grandchildren (Celery's pool) included.
            _signal_group(child, signal.SIGKILL)
            child.wait()


def _signal_group(child: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signum)


def _fleet_settings() -> tuple[Path, str]:
    """VAR_DIR and the agent token, as the control plane's settings resolve them (an
    embedded run generates the token into VAR_DIR on first use)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
    import django
    from django.conf import settings

    django.setup()
    return Path(settings.VAR_DIR), str(settings.AGENT_TOKEN)


def _wait_for_agent(agent_id: str, supervisor: Supervisor, seconds: float, since: datetime) -> bool:
    """Until the local agent has registered in this run, a stop, a child's exit, or
    `seconds`: a request before that would find no agent to load onto."""
    from django.db import connection

    from agents.models import Agent

    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline and not supervisor.stop_requested:
            if supervisor.tend() is not None:  # one keeps dying: watch() stops the fleet
                return False
            # Registered by this run: a row of an earlier run of the same VAR_DIR says nothing.
            if Agent.objects.filter(agent_id=agent_id, updated_at__gte=since).exists():
                return True
            time.sleep(0.5)
        return False
    finally:
        connection.close()


def _banner(base: str, key_file: Path) -> str:
    body = (
        '{"model": "llmfleet/tiny", "messages": [{"role": "user", "content": "Hello!"}], '
        '"max_tokens": 32, "stream": true}'
    )
    return f"""
fleet: ready. The first request cold-starts llmfleet/tiny (download, engine start), then streams.

  export LLMFLEET_KEY=$(cat {key_file})

  curl -N {base}/v1/chat/completions -H "Authorization: Bearer $LLMFLEET_KEY" \\
    -H "Content-Type: application/json" -d '{body}'

  python -c 'import os, openai
c = openai.OpenAI(base_url="{base}/v1", api_key=os.environ["LLMFLEET_KEY"])
for chunk in c.chat.completions.create(model="llmfleet/tiny", stream=True, max_tokens=32,
        messages=[{{"role": "user", "content": "Hello!"}}]):
    print(chunk.choices[0].delta.content or "", end="", flush=True)
print()'

  Embeddings from llmfleet/tiny-embed, the Responses API, and llmfleet/tiny-lora (a LoRA
  adapter served by llmfleet/tiny's engine): docs/api.md, LoRA adapters included.

  Dashboard {base}/dashboard/ and admin {base}/admin/ take a staff user; make one with
    {_here(sys.executable)} manage.py createsuperuser
"""


def _here(path: str) -> str:
    """A path as typed from the project's root, where the banner's commands run."""
    return os.path.relpath(path, ROOT) if Path(path).is_relative_to(ROOT) else path


def main() -> int:
    try:
        host, port = env_str("WEB_HOST"), env_int("WEB_PORT")
        concurrency = env_int("CELERY_LOAD_CONCURRENCY")
        kind, agent_port = env_choice("FLEET_AGENT"), env_int("FLEET_AGENT_PORT")
        max_restarts = env_int("FLEET_MAX_RESTARTS")
    except ImproperlyConfigured as exc:
        raise SystemExit(f"fleet: {exc}") from None
    var_dir, token = _fleet_settings()
    manage = [sys.executable, "manage.py"]
    print("fleet: migrating the database", flush=True)
    subprocess.run([*manage, "migrate", "--noinput"], cwd=ROOT, check=True)
    key_file = var_dir / "demo-api-key"
    if kind != "none":
        print("fleet: preparing the demo model", flush=True)
        subprocess.run([*manage, "setup_demo", "--key-file", str(key_file)], cwd=ROOT, check=True)
    base = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"  # noqa: S104
    specs = process_specs(host, port, concurrency)
    if kind != "none":
        specs.append(agent_spec(kind, base, agent_port, var_dir, token))
    supervisor = Supervisor(specs, max_restarts=max_restarts)
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    since = datetime.now(UTC)
    supervisor.start()
    print(
        f"fleet: web on {base}/ (admin /admin/, API /api/, OpenAI /v1/, "
        f"health /healthz, metrics /metrics); Ctrl-C stops everything",
        flush=True,
    )
    try:
        if kind != "none" and _wait_for_agent(LOCAL_AGENT, supervisor, 120, since):
            print(_banner(base, key_file), flush=True)
        status = supervisor.watch()
    finally:
        supervisor.stop()
    print("fleet: stopped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
