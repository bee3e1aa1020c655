"""A real node agent process for end-to-end tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "e2e-agent-token"


@dataclass
class AgentProcess:
    process: subprocess.Popen[bytes]
    url: str
    cache_dir: Path
    log_path: Path
    token: str

    @property
    def credential(self) -> str:
        """The credential its control plane issued (kept in its cache), else its --token."""
        kept = self.cache_dir / "agent-credential"
        return kept.read_text().strip() if kept.exists() else self.token

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.credential}"}

    def post(self, path: str, body: object | None = None, timeout: float = 30) -> requests.Response:
        return requests.post(f"{self.url}{path}", json=body, headers=self.headers, timeout=timeout)

    def heartbeat(self) -> dict:
        response = self.post("/heartbeat")
        assert response.status_code == 200, response.text
        return response.json()

    def metric(self, series: str) -> float:
        """The agent's /metrics value of `series` (see `agent_metric`)."""
        return agent_metric(self.url, self.credential, series)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_registered(self, seconds: float = 30) -> None:
        """Until the agent itself says it registered: the control plane's row exists a moment
        before the agent has the answer and has kept the credential in it."""
        wait_for(lambda: "registered with" in self.log(), seconds, "the agent's registration")


def agent_metric(url: str, token: str, series: str) -> float:
    """An agent's /metrics value of `series` (name with labels), or the sum over all label
    sets when `series` is a bare name; 0 when the agent has no such series yet. `token`: its
    credential, or the fleet's enrolment token (which /metrics takes too)."""
    headers = {"Authorization": f"Bearer {token}"}
    text = requests.get(f"{url}/metrics", headers=headers, timeout=5).text
    total = 0.0
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if not line.startswith("#") and (key == series or key.startswith(series + "{")):
            total += float(value)
    return total


@contextmanager
def running_agent(
    tmp_path: Path, *args: str, token: str = TOKEN, extra_env: dict[str, str] | None = None
) -> Iterator[AgentProcess]:
    """Start `python -m nodeagent`, wait for /healthz, and stop it with SIGTERM at the end."""
    port = free_port()
    cache_dir = tmp_path / "agent-cache"
    log_path = tmp_path / "agent.log"
    env = {key: value for key, value in os.environ.items() if not key.startswith("AGENT_")}
    # vLLM leaves files in TMPDIR and its cache root: keep them inside the test's directory.
    env.update(
        TMPDIR=str(tmp_path), VLLM_CACHE_ROOT=str(tmp_path / "vllm-cache"), **(extra_env or {})
    )
    argv = [sys.executable, "-m", "nodeagent", "--port", str(port), "--token", token,
            "--cache-dir", str(cache_dir), *args]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    agent = AgentProcess(process, f"http://127.0.0.1:{port}", cache_dir, log_path, token)
    try:
        _wait_healthy(agent)
        yield agent
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def _wait_healthy(agent: AgentProcess) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if agent.process.poll() is not None:
            raise AssertionError(f"the agent exited: {agent.log()}")
        try:
            if requests.get(f"{agent.url}/healthz", timeout=1).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"the agent did not answer /healthz: {agent.log()}")


def processes_mentioning(text: str) -> list[tuple[int, int, str]]:
    """(pid, pgid, command line) of live processes whose command line contains `text`."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,pgid=,stat=,args="], capture_output=True, text=True
    ).stdout
    found = []
    for line in out.splitlines():
        pid, pgid, stat, args = line.split(None, 3)
        if text in args and not stat.startswith("Z"):
            found.append((int(pid), int(pgid), args))
    return found


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group: vLLM's EngineCore renames itself."""
    out = subprocess.run(
        ["ps", "-o", "pid=,stat=", "-g", str(pgid)], capture_output=True, text=True
    ).stdout
    return [
        int(line.split()[0]) for line in out.splitlines() if not line.split()[1].startswith("Z")
    ]


def engine_python() -> str:
    """vLLM's interpreter, as `make engine` built it (or AGENT_ENGINE_PYTHON); fails otherwise."""
    python = os.environ.get("AGENT_ENGINE_PYTHON") or str(ROOT / ".venv-engine" / "bin" / "python")
    if not Path(python).exists():
        pytest.fail(f"vLLM's environment is missing ({python}): `make engine` builds it")
    return python


def enrolment_for(agent_id: str) -> tuple[str, dict[str, str]]:
    """For an agent started without a control plane and catalogued by hand: the credential to
    start it with (its --token) and the Agent row's fields the control plane derives it from."""
    import secrets

    from agents import credentials

    nonce = secrets.token_hex(32)
    credential = credentials.derive(agent_id, nonce)
    return credential, {
        "credential_nonce": nonce,
        "credential_fingerprint": credentials.fingerprint(credential),
    }
