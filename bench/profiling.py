"""Where a process's CPU goes: py-spy samples processes while a load runs, and the busiest
functions of its stacks (bench/gateway.py's `--profile`)."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path


async def profiled(
    processes: dict[str, subprocess.Popen[bytes]],
    seconds: float,
    load: Callable[[], Awaitable[object]],
    keep: Path | None = None,
) -> dict[str, list[str]]:
    """Sample `processes` with py-spy for `seconds` while `load` runs (repeated until then);
    each one's busiest functions, by samples with that function on top (self) and anywhere on
    the stack (total)."""
    spy = Path(sys.executable).with_name("py-spy")
    out = Path(tempfile.mkdtemp(prefix="llmfleet-spy-"))
    spies = [
        await asyncio.create_subprocess_exec(
            str(spy),
            "record",
            "--pid",
            str(process.pid),
            "--rate",
            "1000",
            "--format",
            "raw",
            "--duration",
            str(int(seconds)),
            "--nonblocking",
            "-o",
            str(out / name),
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        for name, process in processes.items()
    ]
    ends = time.monotonic() + seconds
    while time.monotonic() < ends:
        await load()
    for process in spies:
        await process.wait()
    found = {name: summarize(out / name) for name in processes}
    if keep is not None:  # py-spy's collapsed stacks, for a flame graph (e.g. inferno, speedscope)
        os.makedirs(keep, exist_ok=True)
        for name in processes:
            shutil.copy(out / name, keep / f"{name.split(' ')[0]}.folded")
    shutil.rmtree(out, ignore_errors=True)
    return found


def summarize(raw: Path, top: int = 22) -> list[str]:
    """The busiest functions of py-spy's raw (collapsed) stacks."""
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [frame.split(" (")[0] + " (" + frame.split(" (")[-1].split(":")[0].rsplit("/", 1)[-1]
                  + ")" for frame in stack.split(";")]  # fmt: skip
        samples = int(count)
        total += samples
        own[frames[-1]] += samples
        for frame in set(frames):
            anywhere[frame] += samples
    if not total:
        return ["  (no samples)"]
    lines = [f"  {'self %':>7} {'total %':>8}  function (file)"]
    for frame, samples in own.most_common(top):
        lines.append(
            f"  {100 * samples / total:7.1f} {100 * anywhere[frame] / total:8.1f}  {frame}"
        )
    return lines
