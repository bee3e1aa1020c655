"""`python -m controlplane.fleet` (what `make run` starts): the control plane on one machine.

Migrates the database, then runs web (daphne), worker and beat (Celery) as
child processes with their output prefixed by name, and stops them all on
Ctrl-C, on SIGTERM, or as soon as one of them exits: a half-running control
plane is worse than a stopped one.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parent.parent
GRACE_SECONDS = 10.0


@dataclass(frozen=True)
class ProcessSpec:
    name: str
    argv: Sequence[str]


def process_specs(host: str, port: int, concurrency: int) -> list[ProcessSpec]:
    python = sys.executable
    celery = [python, "-m", "celery", "-A", "controlplane"]
    web = [python, "-m", "daphne", "-b", host, "-p", str(port), "controlplane.asgi:application"]
    worker = [*celery, "worker", "--loglevel", "INFO", "--concurrency", str(concurrency)]
    beat = [*celery, "beat", "--loglevel", "INFO"]
    return [ProcessSpec("web", web), ProcessSpec("worker", worker), ProcessSpec("beat", beat)]


def _relay(name: str, stream: IO[bytes]) -> None:
    """Copy a child's output to ours, a line at a time, prefixed with its name."""
    prefix = f"{name:>6} | ".encode()
    for line in iter(stream.readline, b""):
        sys.stdout.buffer.write(prefix + line)
        sys.stdout.buffer.flush()


class Supervisor:
    """Starts the children, watches them, and stops every one of them."""

    def __init__(self, specs: Sequence[ProcessSpec]) -> None:
        self.specs = specs
        self.children: dict[str, subprocess.Popen[bytes]] = {}
        self.stop_requested = False

    def request_stop(self, signum: int, frame: object) -> None:
        # A signal handler only sets the flag; the main loop does the stopping.
        self.stop_requested = True

    def start(self) -> None:
        for spec in self.specs:
            # A session of its own: Ctrl-C reaches us alone, and we stop each child's group.
            child = subprocess.Popen(
                spec.argv,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            assert child.stdout is not None
            threading.Thread(target=_relay, args=(spec.name, child.stdout), daemon=True).start()
            self.children[spec.name] = child

    def watch(self) -> int:
        """Wait for a stop request or a child's exit; the exit status for the whole fleet."""
        while not self.stop_requested:
            for name, child in self.children.items():
                code = child.poll()
                if code is not None:
                    print(f"fleet: {name} exited with status {code}; stopping the rest", flush=True)
                    return code or 1
            time.sleep(0.2)
        return 0

    def stop(self) -> None:
        # SIGTERM to each leader alone: Celery's warm shutdown stops its own pool, which
        # a signal to the whole group would kill mid-task.
        for child in self.children.values():
            if child.poll() is None:
                child.terminate()
        deadline = time.monotonic() + GRACE_SECONDS
        for name, child in self.children.items():
            try:
                child.wait(timeout=max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                print(
                    f"fleet: {name} ignored SIGTERM for {GRACE_SECONDS:.0f} s; killing it",
                    flush=True,
                )
            # Kill whatever is left of the group, grandchildren (Celery's pool) included.
            _signal_group(child, signal.SIGKILL)
            child.wait()


def _signal_group(child: subprocess.Popen[bytes], signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signum)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    if not value.isdigit():
        raise SystemExit(f"fleet: {name}={value!r} is not a positive integer")
    return int(value)


def main() -> int:
    host = os.environ.get("WEB_HOST", "127.0.0.1")
    port = _env_int("WEB_PORT", 8000)
    concurrency = _env_int("CELERY_WORKER_CONCURRENCY", 2)
    print("fleet: migrating the database", flush=True)
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput"], cwd=ROOT, check=True)
    supervisor = Supervisor(process_specs(host, port, concurrency))
    signal.signal(signal.SIGINT, supervisor.request_stop)
    signal.signal(signal.SIGTERM, supervisor.request_stop)
    supervisor.start()
    print(
        f"fleet: web on http://{host}:{port}/ (admin /admin/, API /api/, OpenAI /v1/, "
        f"health /healthz, metrics /metrics); Ctrl-C stops everything",
        flush=True,
    )
    try:
        status = supervisor.watch()
    finally:
        supervisor.stop()
    print("fleet: stopped", flush=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
