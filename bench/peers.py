"""The peers bench/gateway.py and bench/routing.py measure beside llmfleet: LiteLLM's proxy and
vllm-router, each from a virtual environment of its own (built from requirements/ the first
time), started in front of the benchmark's engines."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from stack import ROOT, start

LITELLM_VENV = ROOT / ".venv-litellm"
VLLM_ROUTER_VENV = ROOT / ".venv-vllm-router"


def peer_program(venv: Path, requirements: str, program: str) -> Path:
    """A peer's program in its own virtual environment, built from requirements/<requirements>
    the first time (a few seconds to a few minutes), so that its pins never meet ours."""
    path = venv / "bin" / program
    if not path.exists():
        print(f"building {venv.name} from requirements/{requirements} (once) ...", flush=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run(
            [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
             "-r", str(ROOT / "requirements" / requirements)],
            check=True,
        )  # fmt: skip
    return path


def litellm_command() -> Path:
    """LiteLLM's CLI, building its virtual environment first if need be."""
    return peer_program(LITELLM_VENV, "litellm-bench.txt", "litellm")


def vllm_router_command() -> Path:
    """vllm-router's CLI, building its virtual environment first if need be."""
    return peer_program(VLLM_ROUTER_VENV, "vllm-router-bench.txt", "vllm-router")


def start_vllm_router(engine_port: int, port: int, work: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))}
    return start([str(vllm_router_command()), "--host", "127.0.0.1", "--port", str(port),
                  "--worker-urls", f"http://127.0.0.1:{engine_port}", "--policy", "round_robin",
                  "--log-level", "warning"], env, work / "vllm-router.log")  # fmt: skip


def start_litellm(engine_port: int, port: int, work: Path) -> subprocess.Popen[bytes]:
    config = work / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: bench/sim\n"
        "    litellm_params:\n"
        "      model: openai/bench/sim\n"
        f"      api_base: http://127.0.0.1:{engine_port}/v1\n"
        "      api_key: none\n"
        "litellm_settings:\n"
        "  telemetry: false\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DATABASE_URL", "REDIS_URL"))}
    env.update(LITELLM_LOG="ERROR", LITELLM_TELEMETRY="False")
    return start([str(litellm_command()), "--config", str(config), "--host", "127.0.0.1",
                  "--port", str(port), "--num_workers", "1"], env, work / "litellm.log")  # fmt: skip
