"""Standby engines: vLLM processes that have imported everything and wait for a model.

A plain start spends ~30 of its ~35 s on the CPU importing torch and vLLM in three
processes one after another (API server, EngineCore, worker). The pool keeps
`size` processes of `standby_main.py` that paid for the imports before any load
asked; a load hands one the model's command line and environment, and it becomes
that model's engine in the same process, its EngineCore and worker forked from it
with the imports in place. A taken standby is replaced once the engine it became has
started (its imports would otherwise take the CPU the start needs); one that dies is
replaced, after a back-off when it keeps dying.

Each standby runs in a process group of its own, which becomes the engine's group:
stopping an engine that was a standby is stopping any engine (`VllmEngine.stop`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.engines import identity
from nodeagent.engines.identity import EngineUser

log = logging.getLogger(__name__)

STANDBY_MAIN = Path(__file__).with_name("standby_main.py")
# Imports take ~12 s here, far longer on a loaded host; a standby that says nothing for this
# long is stuck and replaced.
READY_TIMEOUT_SECONDS = 600.0
# A load waits this long at most for a standby still importing (~12 s here): longer, and a
# standby stuck in its imports would hold every cold load.
TAKE_WAIT_SECONDS = 90.0
_BACKOFF_FIRST, _BACKOFF_MAX = 1.0, 60.0

# Flags whose engines a standby cannot become: several GPUs (a standby is one process of one
# device), another executor, or vLLM's NUMA binding, which needs its children spawned.
_PARALLEL_FLAGS = {
    "--tensor-parallel-size": "tensor parallelism",
    "-tp": "tensor parallelism",
    "--pipeline-parallel-size": "pipeline parallelism",
    "-pp": "pipeline parallelism",
    "--data-parallel-size": "data parallelism",
    "-dp": "data parallelism",
}
_EXECUTORS_OK = {"mp", "uni"}


def standby_refusal(args: Sequence[str]) -> str | None:
    """Why a standby cannot become the engine these arguments ask for; None if it can."""
    values = _flag_values(args)
    for flag, what in _PARALLEL_FLAGS.items():
        value = values.get(flag)
        if value is not None and value != "1":
            return f"{flag} {value} ({what}) needs a plain start"
    executor = values.get("--distributed-executor-backend")
    if executor is not None and executor not in _EXECUTORS_OK:
        return f"--distributed-executor-backend {executor} needs a plain start"
    if "--numa-bind" in values:
        return "--numa-bind makes vLLM spawn its processes: a plain start"
    servers = values.get("--api-server-count") or values.get("-asc")
    if servers is not None and servers != "1":
        return f"--api-server-count {servers} (several API server processes) needs a plain start"
    return None


def is_pooling(args: Sequence[str]) -> bool:
    """Whether these engine arguments start a pooling runner (an embedding model's engine)."""
    return _flag_values(args).get("--runner") == "pooling"


# vLLM's defaults for an engine started with --enable-lora.
_DEFAULT_MAX_LORAS, _DEFAULT_MAX_LORA_RANK = 1, 16


def lora_limits(args: Sequence[str]) -> tuple[int, int]:
    """(max_loras, max_lora_rank) of an engine started with these arguments; (0, 0) without
    --enable-lora, vLLM's defaults where a limit is not given."""
    values = _flag_values(args)
    if "--enable-lora" not in values:
        return 0, 0

    def number(flag: str, default: int) -> int:
        try:
            return max(int(values.get(flag) or default), 0)
        except ValueError:
            return default

    return (
        number("--max-loras", _DEFAULT_MAX_LORAS),
        number("--max-lora-rank", _DEFAULT_MAX_LORA_RANK),
    )


# vLLM's max_num_seqs for its OpenAI API server on the CPU (EngineArgs, 0.32). On a GPU it
# depends on the card (256 or 1024): unknown (0) unless the arguments say.
_CPU_MAX_NUM_SEQS = 128


def max_num_seqs(args: Sequence[str], gpu: bool) -> int:
    """How many sequences an engine started with these arguments runs at once; 0: unknown."""
    value = _flag_values(args).get("--max-num-seqs")
    try:
        return max(int(value), 0) if value else (0 if gpu else _CPU_MAX_NUM_SEQS)
    except ValueError:
        return 0


def _flag_values(args: Sequence[str]) -> dict[str, str]:
    """`--flag value` and `--flag=value` pairs (a bare flag maps to "")."""
    values: dict[str, str] = {}
    items = list(args)
    for index, arg in enumerate(items):
        if not arg.startswith("-"):
            continue
        name, sep, value = arg.partition("=")
        if not sep:
            following = items[index + 1] if index + 1 < len(items) else ""
            value = following if following and not following.startswith("-") else ""
        values[name] = value
    return values


@dataclass
class Standby:
    """One ready standby: its process (the leader of its own group) and what it said."""

    process: asyncio.subprocess.Process
    import_seconds: float
    vllm_version: str
    ready_at: float

    @property
    def pid(self) -> int:
        return self.process.pid

    async def hand_over(self, argv: Sequence[str], env: Mapping[str, str], log_path: Path,
                        fork_children: bool) -> None:  # fmt: skip
        """Give it the model: it becomes that engine. Raises OSError if it is gone."""
        spec = {"argv": list(argv), "env": dict(env), "log": str(log_path),
                "fork_children": fork_children}  # fmt: skip
        stdin = self.process.stdin
        if stdin is None or self.process.returncode is not None:
            raise BrokenPipeError("the standby has exited")
        stdin.write((json.dumps(spec) + "\n").encode())
        await stdin.drain()
        stdin.close()


class StandbyPool:
    """Keeps `size` standbys ready; `take` gives one away, `replenish` starts its successor."""

    def __init__(
        self,
        *,
        python: str,
        size: int,
        log_path: Path,
        environ: Mapping[str, str],
        on_death: Callable[[], None] = lambda: None,
        user: EngineUser | None = None,
    ) -> None:
        self.python = python
        self.on_death = on_death
        self.size = size
        self.log_path = log_path
        self.environ = dict(environ)
        self.user = user
        self.ready: list[Standby] = []
        self.starting = 0
        self.held = 0  # taken, their engines still starting: successors wait for them
        self.started = 0
        self.last_error = ""
        self._wake = asyncio.Event()
        self._changed = asyncio.Event()  # a standby became ready or failed
        self._task: asyncio.Task[None] | None = None
        self._children: set[asyncio.Task[None]] = set()
        self._closed = False
        self._backoff = 0.0

    # --- the pool's life ----------------------------------------------------------------

    def start(self) -> None:
        if self.size > 0 and self._task is None:
            for _ in range(self.size):  # counted as starting at once: a load waits for them
                self._spawn_child()
            self._task = asyncio.create_task(self._keep_filled())

    async def close(self) -> None:
        """Stop every standby not given away: nothing outlives the agent."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._children):
            task.cancel()
        await asyncio.gather(*self._children, return_exceptions=True)
        standbys, self.ready = self.ready, []
        await asyncio.gather(*(_end(standby.process) for standby in standbys))

    # --- what loads use -----------------------------------------------------------------

    def take_ready(self) -> Standby | None:
        """A ready standby, now the caller's (call `replenish` once its engine started)."""
        while self.ready:
            standby = self.ready.pop(0)
            if standby.process.returncode is None:
                self.held += 1
                return standby
        return None

    async def take(self, within: float) -> Standby | None:
        """A ready standby, or the one importing now once it is ready (up to `within` s):
        it is ready sooner than a plain start, which does the same imports from nothing."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + min(within, TAKE_WAIT_SECONDS)
        while True:
            standby = self.take_ready()
            if standby is not None or not self.starting or loop.time() >= deadline:
                return standby
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), deadline - loop.time())

    def replenish(self) -> None:
        """The engine a taken standby became has started or failed: start its successor."""
        self.held = max(self.held - 1, 0)
        self._wake.set()

    def why_none(self) -> str:
        """Why `take` found nothing, for the LoadEvent."""
        if self.size <= 0:
            return "standby engines are off (AGENT_STANDBY_ENGINES=0)"
        if self.starting:
            return "no standby was ready yet (one is importing vLLM)"
        if self.last_error:
            return f"no standby is ready: {self.last_error}"
        return "no standby was ready (all taken)"

    @property
    def counts(self) -> dict[str, int]:
        return {"ready": len(self.ready), "starting": self.starting}

    # --- keeping it filled --------------------------------------------------------------

    async def _keep_filled(self) -> None:
        while not self._closed:
            self.ready = [s for s in self.ready if s.process.returncode is None]
            missing = self.size - len(self.ready) - self.starting - self.held
            if missing > 0 and not self.held:
                if self._backoff:
                    await asyncio.sleep(self._backoff)
                for _ in range(missing):
                    self._spawn_child()
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=5.0)

    def _spawn_child(self) -> None:
        self.starting += 1
        task = asyncio.create_task(self._bring_up())
        self._children.add(task)
        task.add_done_callback(self._children.discard)

    async def _bring_up(self) -> None:
        try:
            standby = await self._launch()
        except (OSError, subprocess.SubprocessError, ValueError, TimeoutError) as exc:
            self._failed(str(exc))  # (SubprocessError: the engine user's preexec_fn failed)
            return
        finally:
            self.starting -= 1
            self._changed.set()  # a load waiting in `take` looks again, whatever happened
        if standby is None:
            return
        self._backoff = 0.0
        self.last_error = ""
        self.ready.append(standby)
        self._changed.set()
        log.info("standby engine %d ready (imports took %.1f s)", standby.pid,
                 standby.import_seconds)  # fmt: skip
        self._wake.set()
        await self._watch(standby)

    async def _launch(self) -> Standby | None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log_file:
            log_file.write(f"--- llmfleet: starting a standby at {time.ctime()}\n".encode())
            log_file.flush()
            process = await asyncio.create_subprocess_exec(
                self.python, str(STANDBY_MAIN),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=log_file,
                env=self.environ, start_new_session=True, **identity.process_options(self.user),
            )  # fmt: skip
        self.started += 1
        assert process.stdout is not None
        try:
            line = await asyncio.wait_for(process.stdout.readline(), READY_TIMEOUT_SECONDS)
        except ValueError:  # a line over the stream's limit
            await _end(process)
            raise
        except TimeoutError:
            await _end(process)
            raise TimeoutError(
                f"a standby said nothing for {READY_TIMEOUT_SECONDS:.0f} s; see {self.log_path}"
            ) from None
        except asyncio.CancelledError:
            await _end(process)
            raise
        try:
            said = json.loads(line) if line.strip() else {}
            if not isinstance(said, dict):
                raise ValueError(f"not an object: {line[:200]!r}")
        except ValueError:
            await _end(process)
            raise
        if not said.get("ready"):
            await _end(process)
            why = said.get("error") or f"it exited with status {process.returncode}"
            raise ValueError(f"a standby did not start: {why}; see {self.log_path}")
        return Standby(process, float(said.get("import_seconds", 0.0)),
                       str(said.get("vllm_version", "")), time.monotonic())  # fmt: skip

    async def _watch(self, standby: Standby) -> None:
        """A ready standby that ends before a load takes it died: count it, replace it."""
        code = await standby.process.wait()
        if standby in self.ready:
            self.ready.remove(standby)
            self._failed(f"standby {standby.pid} died (status {code})")

    def _failed(self, why: str) -> None:
        self._changed.set()
        if self._closed:
            return
        self.last_error = why
        self.on_death()
        self._backoff = min(max(self._backoff * 2, _BACKOFF_FIRST), _BACKOFF_MAX)
        log.warning("%s; another starts in %.0f s", why, self._backoff)
        self._wake.set()


async def end_standby(standby: Standby) -> None:
    """Stop a standby taken but never handed a model."""
    await _end(standby.process)


async def _end(process: asyncio.subprocess.Process, grace: float = 5.0) -> None:
    """Stop a standby that never became an engine, and anything it started."""
    if process.returncode is None and process.stdin is not None:
        process.stdin.close()  # end of input: it exits on its own
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(process.wait(), grace)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()
