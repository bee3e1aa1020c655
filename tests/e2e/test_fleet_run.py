"""`make run`'s process: web, the three workers and beat on embedded defaults, for real."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import openai
import pytest
import requests

from tests.e2e.agent_process import engine_python, processes_mentioning
from tests.support import free_port, http_ok, wait_for

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.e2e


def group_alive(pgid: int) -> bool:
    out = subprocess.run(["ps", "-o", "pid=", "-g", str(pgid)], capture_output=True, text=True)
    return bool(out.stdout.strip())


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    """No DATABASE_URL, no REDIS_URL: what a fresh machine's `make run` gets."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"DATABASE_URL", "REDIS_URL", "SECRET_KEY", "AGENT_TOKEN"}
    }
    env.update(
        VAR_DIR=str(tmp_path / "var"), WEB_PORT=str(free_port()), CELERY_LOAD_CONCURRENCY="2",
        FLEET_AGENT="none", FLEET_AGENT_PORT=str(free_port()),
    )  # fmt: skip
    return env


def test_make_run_serves_health_and_stops_everything_on_ctrl_c(embedded_env, tmp_path):
    log_path = tmp_path / "fleet.log"
    with log_path.open("wb") as log:
        fleet = subprocess.Popen(
            [sys.executable, "-m", "controlplane.fleet"],
            cwd=ROOT,
            env=embedded_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{embedded_env['WEB_PORT']}"
    try:
        wait_for(lambda: http_ok(f"{base}/healthz"), 90, "/healthz")
        assert requests.get(f"{base}/healthz", timeout=5).json()["checks"] == {"database": "ok"}
        wait_for(
            lambda: log_path.read_bytes().count(b" ready.") >= 3,
            60,
            "the three workers",
        )
        wait_for(lambda: b"beat: Starting" in log_path.read_bytes(), 60, "beat")
        # The worker is reachable through the embedded file-system broker from another process.
        inspect = [sys.executable, "-m", "celery", "-A", "controlplane", "inspect"]
        ping = subprocess.run(
            [*inspect, "ping", "--timeout", "10"],
            cwd=ROOT,
            env=embedded_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        # The three workers, one per queue, answer: heartbeats never wait behind loads, and
        # neither waits behind a batch.
        assert "control@" in ping.stdout, ping.stdout + ping.stderr
        assert "loads@" in ping.stdout, ping.stdout
        assert "batches@" in ping.stdout, ping.stdout
        assert ping.stdout.count("pong") == 3, ping.stdout
        # The admin's static files are served by the ASGI app itself.
        assert requests.get(f"{base}/static/admin/css/base.css", timeout=5).status_code == 200
        assert (Path(embedded_env["VAR_DIR"]) / "db.sqlite3").exists()
    finally:
        fleet.send_signal(signal.SIGINT)
        try:
            fleet.wait(timeout=40)
        except subprocess.TimeoutExpired:
            os.killpg(fleet.pid, signal.SIGKILL)
            raise
    log = log_path.read_text(errors="replace")
    assert fleet.returncode == 0, log
    assert "fleet: stopped" in log
    assert not http_ok(f"{base}/healthz")
    # A first run that reads well: no line per routine task, and Ctrl-C logs no ERROR.
    assert "Sending due task" not in log
    assert "Task agents.tasks.poll_heartbeats" not in log
    assert " ERROR " not in log
    assert "Unclosed" not in log


def children_of(pid: int) -> dict[int, str]:
    out = subprocess.run(
        ["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True
    )
    return {
        int(line.split(None, 1)[0]): line.split(None, 1)[1]
        for line in out.stdout.strip().splitlines()
    }


def test_a_process_that_dies_is_started_again_and_one_that_keeps_dying_stops_the_fleet(
    embedded_env, tmp_path
):
    """`make run` ran a half fleet when the embedded broker killed its worker; now the
    worker comes back (the fleet says so), and only one that keeps dying stops everything."""
    env = {**embedded_env, "FLEET_MAX_RESTARTS": "2"}
    fleet = subprocess.Popen(
        [sys.executable, "-m", "controlplane.fleet"], cwd=ROOT, env=env,
        stdout=(tmp_path / "fleet.log").open("wb"), stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    health = f"http://127.0.0.1:{embedded_env['WEB_PORT']}/healthz"

    def output() -> str:
        return (tmp_path / "fleet.log").read_text(errors="replace")

    def the_worker() -> int:
        return next(pid for pid, args in children_of(fleet.pid).items() if " worker " in args
                    and "--queues control" in args)  # fmt: skip

    try:
        wait_for(lambda: http_ok(health), 90, "/healthz")
        first_children = children_of(fleet.pid)
        assert len(first_children) == 5, first_children  # web, three workers, beat
        for restart in (1, 2):
            worker = the_worker()
            os.kill(worker, signal.SIGKILL)
            wait_for(lambda r=restart: f"starting it again (restart {r} of 2" in output(), 20,
                     "the restart")  # fmt: skip
            wait_for(lambda w=worker: the_worker() != w, 20, "a new worker")
            assert fleet.poll() is None
            assert http_ok(health)
        os.kill(the_worker(), signal.SIGKILL)  # a third death within the minute
        fleet.wait(timeout=60)
    finally:
        if fleet.poll() is None:
            os.killpg(fleet.pid, signal.SIGKILL)
    assert fleet.returncode != 0
    assert "it keeps dying; stopping the rest" in output()
    # Killed processes linger until init reaps them: allow it a moment.
    wait_for(lambda: not any(group_alive(pid) for pid in first_children), 10, "every child to exit")


def test_a_bad_port_setting_is_refused_before_anything_starts(embedded_env):
    embedded_env["WEB_PORT"] = "not-a-port"
    result = subprocess.run(
        [sys.executable, "-m", "controlplane.fleet"],
        cwd=ROOT,
        env=embedded_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "fleet: WEB_PORT='not-a-port' is not an integer" in result.stderr


def test_make_run_cold_starts_the_demo_model_with_vllm_and_ctrl_c_leaves_nothing(
    embedded_env, tmp_path
):
    """The README's promise: one command, then the printed command streams an answer."""
    embedded_env.update(FLEET_AGENT="vllm", AGENT_ENGINE_PYTHON=engine_python(),
                        CELERY_LOAD_CONCURRENCY="4")  # fmt: skip
    var_dir = embedded_env["VAR_DIR"]
    log_path = tmp_path / "fleet.log"
    with log_path.open("wb") as log:
        fleet = subprocess.Popen(
            [sys.executable, "-m", "controlplane.fleet"], cwd=ROOT, env=embedded_env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    try:
        wait_for(lambda: b"fleet: ready" in log_path.read_bytes(), 120, "the ready banner")
        banner = log_path.read_text(errors="replace")
        base = f"http://127.0.0.1:{embedded_env['WEB_PORT']}"
        assert f"curl -N {base}/v1/chat/completions" in banner
        key = (Path(var_dir) / "demo-api-key").read_text().strip()
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=300)
        stream = client.chat.completions.create(
            model="llmfleet/tiny", messages=[{"role": "user", "content": "Hello!"}],
            max_tokens=8, stream=True, extra_body={"ignore_eos": True},
        )  # fmt: skip
        words = [c.choices[0].delta.content for c in stream if c.choices]
        assert sum(1 for word in words if word) >= 2
        assert [p for p in processes_mentioning(var_dir) if "api_server" in p[2]]
    finally:
        fleet.send_signal(signal.SIGINT)
        try:
            fleet.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(fleet.pid, signal.SIGKILL)
            raise
    assert fleet.returncode == 0, log_path.read_text(errors="replace")
    wait_for(lambda: not processes_mentioning(var_dir), 10, "every process of the fleet to end")
