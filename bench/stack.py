"""The processes a benchmark runs, and the llmfleet stack bench/gateway.py measures.

Starting, stopping and asking processes whether they answer yet, their CPU read from /proc,
`manage.py shell` against the benchmark's database; node agents with the sim engine and web
processes run from one code tree (this checkout or the baseline's worktree), catalogued by hand
in the benchmark's database. bench/batch.py, bench/fairness.py and bench/routing.py use them too.
Importing this module puts the repository root on sys.path (for `tests.support` and the rest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support import free_port, wait_for  # noqa: E402

SIM = [
    "--sim-load-seconds",
    "0",
    "--sim-ttft-ms",
    "0",
    "--sim-tpot-ms",
    "TPOT",
    "--sim-max-num-seqs",
    "256",
]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def answers(url: str, timeout: float = 1) -> bool:
    """Whether `url` answers yet; give a web process whose first answers may take seconds a
    longer `timeout`."""
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code < 500
    except requests.RequestException:
        return False


def start(
    argv: list[str], env: dict[str, str], log: Path, cwd: Path = ROOT
) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=cwd, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT)


def stop(processes: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    """Terminate them all, then wait for each (killed past `timeout`)."""
    for process in processes:
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def manage(code: str, env: dict[str, str]) -> str:
    """The last line `code` prints, run in `manage.py shell` against the benchmark's database."""
    out = subprocess.run([sys.executable, "manage.py", "shell", "-c", code], cwd=ROOT, env=env,
                         check=True, capture_output=True, text=True).stdout  # fmt: skip
    return out.strip().splitlines()[-1]


class AgentProc:
    """A node agent with the sim engine, run from one code tree, catalogued by hand in the
    benchmark's database: its token is the credential the gateway derives for its row
    (README: Agent enrolment)."""

    def __init__(self, name: str, tree: Path, env: dict[str, str], work: Path, tpot_ms: float):
        self.name, self.tree, self.env, self.work, self.tpot_ms = name, tree, env, work, tpot_ms
        self.port = free_port()
        self.endpoints: dict[str, str] = {}

    def start(self) -> subprocess.Popen[bytes]:
        self.token = manage(
            "import secrets; from agents import credentials; from agents.models import Agent; "
            f"n = secrets.token_hex(32); c = credentials.derive('{self.name}', n); "
            f"Agent.objects.create(agent_id='{self.name}', "
            f"base_url='http://127.0.0.1:{self.port}', credential_nonce=n, "
            "credential_fingerprint=credentials.fingerprint(c)); print(c)",
            self.env,
        )
        self.process = start([sys.executable, "-m", "nodeagent", "--port",
                              str(self.port), "--token", self.token, "--engine", "sim",
                              "--cache-dir", str(self.work / f"cache-{self.name}"),
                              "--log-level", "WARNING",
                              *(str(self.tpot_ms) if arg == "TPOT" else arg for arg in SIM)],
                             self.env, self.work / f"agent-{self.name}.log", self.tree)  # fmt: skip
        wait_for(lambda: answers(f"http://127.0.0.1:{self.port}/healthz"), 30, "an agent")
        return self.process

    def load(self, models: dict[str, list[str]], checkpoint: Path) -> None:
        import requests

        for model, engine_args in models.items():
            self.endpoints[model] = requests.post(
                f"http://127.0.0.1:{self.port}/load_model",
                json={"model_id": model, "source": checkpoint.as_uri(),
                      "engine": {"args": engine_args}},
                headers={"Authorization": f"Bearer {self.token}"}, timeout=30,
            ).json()["inference_endpoint_url"]  # fmt: skip
        rows = [(m, "embedding" if "embed" in m else "generate", u)
                for m, u in self.endpoints.items()]  # fmt: skip
        manage(
            "from agents.models import Agent, Model, Placement\n"
            f"a = Agent.objects.get(agent_id='{self.name}')\n"
            f"for model_id, kind, url in {rows!r}:\n"
            "    m = Model.objects.create(model_id=model_id, source='file:///x', kind=kind)\n"
            "    Placement.objects.create(agent=a, model=m, state='READY', "
            "cache_level='GPU_RESIDENT', inference_endpoint_url=url)\n"
            "print('ok')",
            self.env,
        )

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Stack:
    """Node agents and a gateway run from one code tree: this checkout, or the
    baseline's worktree. All share the benchmark's database; each agent has its own row and
    serves models of its own. `plain` serves the non-streaming cases (engines that answer at
    once); `stream` the streaming case (engines with a time per token)."""

    def __init__(
        self, name: str, tree: Path, env: dict[str, str], work: Path, tpot_ms: float
    ) -> None:
        self.name, self.tree, self.env, self.work = name, tree, env, work
        self.web_port = free_port()
        self.plain = AgentProc(name, tree, env, work, 0.0)
        self.stream = AgentProc(f"{name}-stream", tree, env, work, tpot_ms)

    def start_web(self, server: str) -> subprocess.Popen[bytes]:
        argv = (
            ["-m", "daphne", "-b", "127.0.0.1", "-p", str(self.web_port),
             "controlplane.asgi:application"]
            if server == "daphne"
            else ["-m", "controlplane.web", "--host", "127.0.0.1", "--port", str(self.web_port)]
        )  # fmt: skip
        self.web = start([sys.executable, *argv], self.env, self.work / f"web-{self.name}.log",
                         self.tree)  # fmt: skip
        wait_for(lambda: answers(f"http://127.0.0.1:{self.web_port}/healthz"), 30, "the web server")
        return self.web


def baseline_tree(ref: str, work: Path) -> Path:
    """A worktree of `ref` to run the baseline's agent and gateway from (removed at the end)."""
    tree = work / "baseline"
    subprocess.run(["git", "worktree", "add", "--detach", "--quiet", str(tree), ref], cwd=ROOT,
                   check=True)  # fmt: skip
    return tree
