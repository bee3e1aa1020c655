"""A standby engine: a process of vLLM's own interpreter that has imported everything an
engine needs and waits for a model. The node agent runs it; it never imports nodeagent.

    ENGINE_PYTHON standby_main.py

1. Imports torch and vLLM (the API server, the EngineCore, the worker, the model
   loader): the ~30 s a plain start spends on imports, paid before any load asks.
2. Checks that nothing initialized CUDA (a fork after that is unsafe), then writes one
   JSON line to stdout: `{"ready": true, ...}`, or `{"ready": false, "error": ...}` and
   exits 3.
3. Reads one JSON line from stdin: `{"argv": [...], "env": {...}, "unset": [...],
   "log": PATH}`. End of input (the agent went away) ends it, status 0.
4. Sends its output to the model's log, takes the model's environment, and becomes the
   engine: `python -m vllm.entrypoints.openai.api_server ARGV` in this same process, so
   its process group (its EngineCore and worker) is the engine's, as with a plain start.

vLLM starts the EngineCore, and on the CPU the worker, with multiprocessing: `spawn`
(a fresh interpreter that imports everything again) where CUDA or OpenMP state makes
fork unsafe. Nothing here has initialized either, so where `fork_children` is asked for
the standby keeps them forked: they inherit the imports and start in a fraction of a
second.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import time
from typing import Any

# Run by path, this file's directory (nodeagent/engines, which holds a vllm.py) would
# shadow the real vllm package.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [entry for entry in sys.path if os.path.abspath(entry or ".") != _HERE]

# What the API server, the EngineCore and the worker import on the way to serving, in the
# order they do. A module missing from this vLLM version is skipped, never fatal.
PRELOAD = (
    "torch",
    "vllm",
    "vllm.entrypoints.openai.api_server",
    "vllm.engine.arg_utils",
    "vllm.v1.engine.async_llm",
    "vllm.v1.engine.core",
    "vllm.v1.engine.core_client",
    "vllm.v1.executor.multiproc_executor",
    "vllm.v1.executor.uniproc_executor",
    "vllm.v1.worker.cpu_worker",
    "vllm.v1.worker.cpu_model_runner",
    "vllm.v1.worker.gpu_worker",
    "vllm.v1.worker.gpu_model_runner",
    "vllm.model_executor.model_loader",
    "vllm.model_executor.models.llama",
    "vllm.v1.attention.backends.cpu_attn",
    "vllm.v1.sample.sampler",
    "transformers",
)


# The agent reads one JSON line from our stdout. Whatever the imports print (vLLM logs to
# stdout) goes to stderr, the standby's log: the line is written to a private copy of fd 1.
_SAY_FD = -1


def _say(message: dict[str, object]) -> None:
    os.write(_SAY_FD, (json.dumps(message) + "\n").encode())


def preload() -> list[str]:
    """Import every module of PRELOAD that exists; the ones skipped, with why."""
    skipped = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an optional module: skip it, say which
            skipped.append(f"{name}: {type(exc).__name__}: {exc}"[:200])
    return skipped


def cuda_initialized() -> bool:
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    return bool(cuda is not None and cuda.is_initialized())


def keep_children_forked() -> None:
    """vLLM's CPU platform sets VLLM_WORKER_MULTIPROC_METHOD=spawn while it checks the
    config, because OpenMP does not survive a fork once its threads run. No thread of it
    runs in this process yet (nothing computed), so fork is safe and keeps the imports."""
    try:
        from vllm.platforms import current_platform  # type: ignore[import-not-found]
    except Exception:  # without a platform, vLLM itself will say why
        return
    platform = type(current_platform)
    original = platform.check_and_update_config

    def check_and_update_config(vllm_config: object) -> None:
        original(vllm_config)
        if os.environ.get("VLLM_WORKER_MULTIPROC_METHOD") == "spawn" and not cuda_initialized():
            os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "fork"

    platform.check_and_update_config = classmethod(
        lambda cls, vllm_config: check_and_update_config(vllm_config)
    )


def inspect_in_process() -> None:
    """vLLM inspects a model's class in a fresh interpreter (~10 s of imports) so that the
    import cannot initialize CUDA in the API server. Here everything is imported already:
    inspect in this process. Should that ever initialize CUDA, vLLM sees it and spawns its
    children instead of forking them, which is slower but as safe."""
    try:
        from vllm.model_executor.models import registry  # type: ignore[import-not-found]
    except Exception:  # vLLM itself will say what is wrong
        return
    if hasattr(registry, "_run_in_subprocess"):
        registry._run_in_subprocess = lambda fn: fn()


def _retitle(command: list[str]) -> None:
    """Show the engine's command line in ps (and /proc), as a plain start would, so an
    operator sees which model this process serves."""
    try:
        import setproctitle  # type: ignore[import-not-found]  # vLLM's own dependency
    except ImportError:
        return
    setproctitle.setproctitle(" ".join(command))


def become_engine(spec: dict[str, Any]) -> None:
    import runpy
    import tempfile

    argv = [str(arg) for arg in spec["argv"]]
    env = {str(key): str(value) for key, value in dict(spec["env"]).items()}
    log_fd = os.open(str(spec["log"]), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    # Before the environment changes: setproctitle needs the process's original one.
    _retitle([sys.executable, "-m", "vllm.entrypoints.openai.api_server", *argv])
    # The engine's environment, exactly what a plain start would have been given.
    os.environ.clear()
    os.environ.update(env)
    tempfile.tempdir = None  # TMPDIR is the engine's own now
    envs = sys.modules.get("vllm.envs")
    if envs is not None and hasattr(envs, "disable_envs_cache"):
        envs.disable_envs_cache()  # values are read from the environment set just now
    if spec.get("fork_children"):
        keep_children_forked()
        inspect_in_process()
    sys.argv = ["vllm.entrypoints.openai.api_server", *argv]
    print(f"llmfleet: standby {os.getpid()} becomes the engine", flush=True)
    runpy.run_module("vllm.entrypoints.openai.api_server", run_name="__main__", alter_sys=True)


def main() -> int:
    global _SAY_FD
    _SAY_FD = os.dup(1)
    os.dup2(2, 1)
    started = time.monotonic()
    skipped = preload()
    if cuda_initialized():
        _say({"ready": False, "error": "CUDA was initialized by the imports: a fork is unsafe"})
        return 3
    vllm = sys.modules.get("vllm")
    _retitle([sys.executable, os.path.abspath(__file__), "(llmfleet standby engine: ready)"])
    _say({
        "ready": True,
        "pid": os.getpid(),
        "import_seconds": round(time.monotonic() - started, 3),
        "vllm_version": getattr(vllm, "__version__", ""),
        "skipped": skipped,
    })  # fmt: skip
    os.close(_SAY_FD)  # all the agent reads from us: what follows goes to the logs
    line = sys.stdin.readline()
    if not line.strip():
        return 0  # the agent closed our stdin: it no longer wants a standby
    become_engine(json.loads(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
