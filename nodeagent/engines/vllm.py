"""The `vllm` engine: one `vllm.entrypoints.openai.api_server` process per model.

It runs with the interpreter of vLLM's own virtual environment, in a process
group of its own (vLLM starts an EngineCore child), with its output in a log
file per model. It is either started plainly (a new process that imports
everything) or a standby that becomes it (`nodeagent.engines.standby`); either way
stopping sends SIGTERM to the group, then SIGKILL after the grace period, and
waits until no process of the group is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from nodeagent import engineargs
from nodeagent.engines import identity
from nodeagent.engines.base import EngineError, EngineExit, wait_until_ready
from nodeagent.engines.identity import EngineUser
from nodeagent.engines.standby import Standby, end_standby, max_num_seqs
from nodeagent.kvevents import KvFeed
from nodeagent.protocol import EngineStart

LOG_TAIL_LINES = 25
API_SERVER = "vllm.entrypoints.openai.api_server"


def vllm_argv(
    python: str,
    model_dir: Path,
    model_id: str,
    port: int,
    args: Sequence[str],
    *,
    gpu: bool,
    gpu_memory_share: float,
    trust_remote_code: bool = False,
    kv_events_config: str | None = None,
    otlp_traces_endpoint: str = "",
) -> list[str]:
    """The engine's command line: the model's own arguments (nodeagent.engineargs checked
    them), then the agent's, which win over anything before them (argparse keeps the last
    value), so the engine always listens where the agent says. On a GPU: sleep mode (the DRAM
    tier) and the memory share, unless the model's own arguments set it."""
    argv = [
        python,
        "-m",
        API_SERVER,
        *args,
        "--model",
        str(model_dir),
        "--served-model-name",
        model_id,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    if trust_remote_code:
        argv.append("--trust-remote-code")
    if kv_events_config is not None:
        argv += ["--kv-events-config", kv_events_config]
    if otlp_traces_endpoint:  # its spans continue the agent's (the traceparent it forwards)
        argv += ["--otlp-traces-endpoint", otlp_traces_endpoint]
    if gpu:
        argv.append("--enable-sleep-mode")
        given = {engineargs.canonical(arg.partition("=")[0]) for arg in args}
        if "--gpu-memory-utilization" not in given:
            argv += ["--gpu-memory-utilization", f"{gpu_memory_share:g}"]
    return argv


class VllmEngine:
    name = "vllm"

    def __init__(
        self,
        *,
        model_id: str,
        argv: Sequence[str],
        port: int,
        log_path: Path,
        tmp_dir: Path,
        grace: float,
        gpu: bool,
        environ: Mapping[str, str],
        standby: Standby | None = None,
        user: EngineUser | None = None,
        fork_children: bool = True,
        start_note: str = "",
        kv_feed: KvFeed | None = None,
    ) -> None:
        self.model_id = model_id
        self.kv_feed = kv_feed
        self.argv = list(argv)
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = log_path
        self.tmp_dir = tmp_dir
        self.grace = grace
        # vLLM's sleep mode needs a CUDA GPU: on the CPU --enable-sleep-mode refuses to start.
        self.supports_sleep = gpu
        self.max_num_seqs = max_num_seqs(self.argv, gpu)
        self.environ = dict(environ)
        self.process: asyncio.subprocess.Process | None = None
        self._log_offset = 0
        self._stopping = False
        self._exited: asyncio.Future[EngineExit] | None = None
        self.standby = standby
        self.user = user
        self.fork_children = fork_children
        # How it started ("standby" or "plain") and, for a plain start, why: the LoadEvent's.
        self.start_mode: EngineStart = "standby" if standby is not None else "plain"
        self.start_note = start_note

    def _env(self) -> dict[str, str]:
        env = dict(self.environ)
        # Each engine leaves files in TMPDIR (/tmp/vllm_dist_*): give it one we delete after.
        env["TMPDIR"] = str(self.tmp_dir)
        if self.supports_sleep:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # exposes /sleep and /wake_up (on 127.0.0.1 only)
        return env

    async def start(self, session: aiohttp.ClientSession, deadline: float) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.touch()
        # A standby opens the log itself, as the engine user: that user's, like its TMPDIR.
        identity.own(self.user, self.tmp_dir, self.log_path)
        if self.standby is not None:
            self.process = await self._adopt(self.standby)
        if self.process is None:
            self.process = await self._launch()
        self._exited = asyncio.ensure_future(self._watch(self.process))
        try:
            await wait_until_ready(self, session, self.model_id, deadline, self._exited)
        except (EngineError, asyncio.CancelledError) as exc:
            await self.stop()
            if isinstance(exc, EngineError):
                raise EngineError(
                    exc.code, f"{exc}; last lines of its log:\n{self.log_tail()}"
                ) from None
            raise

    async def _adopt(self, standby: Standby) -> asyncio.subprocess.Process | None:
        """Hand the model to the standby; None (and a plain start) if it died meanwhile or
        could not be handed the model (then it is stopped: nothing of it stays behind)."""
        try:
            with self.log_path.open("ab") as log:
                command = " ".join(self.argv)
                log.write(f"--- llmfleet: standby {standby.pid} becomes {command}\n".encode())
                self._log_offset = log.tell()
            server_args = self.argv[self.argv.index(API_SERVER) + 1 :]
            await standby.hand_over(server_args, self._env(), self.log_path, self.fork_children)
        except (OSError, RuntimeError) as exc:
            await end_standby(standby)
            self.start_mode = "plain"
            self.start_note = f"the standby could not take the model ({exc}): started plainly"
            return None
        return standby.process

    async def _launch(self) -> asyncio.subprocess.Process:
        with self.log_path.open("ab") as log:
            log.write(f"--- llmfleet: starting {' '.join(self.argv)}\n".encode())
            log.flush()
            self._log_offset = log.tell()
            try:
                return await asyncio.create_subprocess_exec(
                    *self.argv,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=log,
                    stderr=asyncio.subprocess.STDOUT,
                    env=self._env(),
                    start_new_session=True,
                    **identity.process_options(self.user),
                )
            except (OSError, subprocess.SubprocessError) as exc:  # (the latter: preexec_fn's)
                raise EngineError(
                    "engine_start_failed", f"cannot run {self.argv[0]}: {exc}"
                ) from None

    async def _watch(self, process: asyncio.subprocess.Process) -> EngineExit:
        code = await process.wait()
        if self._stopping:
            return EngineExit(expected=True, returncode=code, detail=f"stopped, status {code}")
        # Its EngineCore child may outlive it: nothing of a dead engine stays behind.
        self._kill_group(signal.SIGKILL)
        return EngineExit(expected=False, returncode=code, detail=f"exit status {code}")

    async def wait(self) -> EngineExit:
        assert self._exited is not None, "engine never started"
        exit_info = await asyncio.shield(self._exited)
        if exit_info.expected:
            return exit_info
        return EngineExit(
            False, exit_info.returncode, f"{exit_info.detail}; log tail:\n{self.log_tail()}"
        )

    async def stop(self) -> None:
        self._stopping = True
        process = self.process
        if process is not None and process.returncode is None:
            self._kill_group(signal.SIGTERM)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(process.wait()), self.grace)
        self._kill_group(signal.SIGKILL)
        if process is not None:
            await process.wait()
            await self._wait_group_gone(process.pid)
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        if self.kv_feed is not None:
            await self.kv_feed.close()

    def _kill_group(self, signum: signal.Signals) -> None:
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.process.pid, signum)

    @staticmethod
    async def _wait_group_gone(pgid: int, within: float = 10.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while loop.time() < deadline:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                return
            await asyncio.sleep(0.05)

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last lines this start wrote to the engine's log."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self._log_offset)
                text = log.read().decode(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"
