"""A Batch API batch on a busy fleet: does it fill the capacity interactive traffic leaves
idle, without costing interactive requests their time to first token?

    .venv/bin/python bench/batch.py [--quick] [--lines 10000] [--database-url URL]

Runs what `make run` runs without its agent (`python -m controlplane.fleet`, FLEET_AGENT=none:
web, the control, loads and batches workers, beat), on PostgreSQL and Redis when
`--database-url` / `--redis-url` are given (a database of its own, made afresh; the figures
in bench/README.md come from those), else on the embedded defaults in a temporary VAR_DIR.
Two sim node agents register with it, each engine with `--seqs` seats, a time to first token
of `--ttft-ms` and `--tpot-ms` per token after it, and log every request they take.

Three models: `bench/chat` served on both agents (its two replicas: the capacity measured),
`bench/cold-1` and `bench/cold-2` served nowhere. Two API keys: one sends steady interactive
traffic (streamed chats of `--chat-tokens` tokens, Poisson arrivals at `--rate` per second);
the other a batch of `--lines` lines (`--line-tokens` tokens each), nine in ten for
`bench/chat` and the rest for the two cold models, interleaved in the file.

1. The interactive traffic alone for `--seconds`: its TTFT p99 is the baseline.
2. The same traffic while the batch runs, created with the official `openai` client, to its
   end.

RESULT fields:

- `completed`, `failed`: the batch's request_counts at its end; `duplicated`: lines the
  engines took more than once (their own request logs), against the output file, which must
  hold each line once;
- `interactive_p99_ratio`: interactive TTFT p99 while the batch's `bench/chat` lines ran, over
  the baseline (target <= 1.2);
- `batch_share_of_idle`: the seats the batch's lines held (lines per second times an
  engine's time per line, over the middle of its `bench/chat` lines: from 10 % to 80 % of
  them done) over the seats the interactive traffic left idle there (the two engines' seats
  less the interactive requests per second times the engine's time per request) (target
  >= 0.8);
- `cold_starts_per_model`: loads of each cold model during the batch, the most of the two
  (target 1), and `chat_loads` those of `bench/chat` (0: it was warm).

Also printed: the CPU each part of the fleet used while the batch ran (from /proc).
`BENCH_DUMP=<file>` writes each interactive request's start and TTFT during the batch, and
the batch's progress, as JSON: where a slow request sits in time says what delayed it.

`--quick` runs a small batch and short phases, so that the test suite runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from loadgen import p
from stack import answers, manage, start, stop

from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHAT = "bench/chat"
COLD = ("bench/cold-1", "bench/cold-2")
AGENTS = 2
P99_TARGET, SHARE_TARGET = 1.2, 0.8


@dataclass
class Interactive:
    """What the interactive key saw: each request's start (monotonic) and TTFT, and statuses."""

    started: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)

    def p_between(self, since: float, until: float, q: float) -> float:
        chosen = [t for s, t in zip(self.started, self.ttfts, strict=True) if since <= s < until]
        return p(chosen, q) if chosen else float("nan")

    def p99_between(self, since: float, until: float) -> float:
        return self.p_between(since, until, 99)

    def rate_between(self, since: float, until: float) -> float:
        return sum(1 for s in self.started if since <= s < until) / max(until - since, 1e-9)


def fresh_database(url: str) -> None:
    """Drop and create the database `url` names, on its server."""
    import psycopg

    parts = urlsplit(url)
    name = parts.path.lstrip("/")
    server = urlunsplit(parts._replace(path="/postgres"))
    with psycopg.connect(server, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        connection.execute(f'CREATE DATABASE "{name}"')


def environment(args: argparse.Namespace, work: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "AGENT_TOKEN", "SECRET_KEY", "VAR_DIR"}}  # fmt: skip
    env.update(
        VAR_DIR=str(work / "var"), AGENT_TOKEN="bench-token", SECRET_KEY="bench-secret",
        LOG_LEVEL="WARNING", PYTHONPATH="", FLEET_AGENT="none", WEB_PORT=str(port),
        CELERY_LOAD_CONCURRENCY="4", HEARTBEAT_INTERVAL_SECONDS="2",
        BATCH_CONCURRENCY=str(args.concurrency),
    )  # fmt: skip
    if args.database_url:
        import redis

        fresh_database(args.database_url)
        redis.Redis.from_url(args.redis_url).flushdb()
        env.update(DATABASE_URL=args.database_url, REDIS_URL=args.redis_url)
    return env


def start_agents(args: argparse.Namespace, env: dict[str, str], work: Path, base: str) -> list[
    subprocess.Popen[bytes]
]:  # fmt: skip
    agents = []
    for n in range(1, AGENTS + 1):
        agents.append(start(
            [sys.executable, "-m", "nodeagent", "--agent-id", f"bench-{n}", "--port",
             str(free_port()), "--control-plane-url", base, "--cache-dir", str(work / f"cache-{n}"),
             "--engine", "sim", "--log-level", "WARNING", "--sim-load-seconds", "2",
             "--sim-ttft-ms", str(args.ttft_ms), "--sim-tpot-ms", str(args.tpot_ms),
             "--sim-max-num-seqs", str(args.seqs), "--batch-reserve-percent",
             str(args.reserve_percent), "--sim-request-log",
             str(work / f"requests-{n}.jsonl")],
            env, work / f"agent-{n}.log",
        ))  # fmt: skip
    return agents


SETUP = """
import json
from agents import actions
from agents.models import Agent
from controlplane.gateway.actions import create_api_key
from pathlib import Path
from nodeagent import tinymodel
uri = tinymodel.build(Path({checkpoint!r})).as_uri()
chat, _ = actions.register_catalog_model({chat!r}, uri, size_bytes=1, max_replicas={agents})
for model_id in {cold!r}:
    actions.register_catalog_model(model_id, uri, size_bytes=1)
for agent in Agent.objects.order_by("agent_id"):
    actions.load_on_agent(chat, agent)
keys = {{name: create_api_key(name)[1] for name in ("interactive", "batch")}}
print(json.dumps(keys))
"""

COUNT = (
    "from agents.models import Agent, Placement\n"
    "print(Agent.objects.filter(state__in=['IDLE', 'INFERRING', 'LOADING_MODEL']).count(), "
    "Placement.objects.filter(model__model_id={chat!r}, state='READY').count())"
)

LOADS = (
    "import json\nfrom agents.models import LoadEvent\n"
    "print(json.dumps({{m: LoadEvent.objects.filter(kind='LOAD', model__model_id=m, "
    "queued_at__gte={since!r}).count() for m in {models!r}}}))"
)


def batch_input(lines: int, tokens: int) -> tuple[bytes, int, float]:
    """The batch's file: nine lines in ten for CHAT, the rest for the cold models, interleaved
    (the runner groups them); how many are CHAT's, and their mean answer length. Lengths vary
    as real answers' do (a quarter to seven quarters of `tokens`): the sim's answers have
    exactly max_tokens tokens, and lines of one length started together would end together,
    a cohort no real batch keeps."""
    rng = random.Random(11)  # noqa: S311 (lengths, not secrets)
    rows, chat, chat_tokens = [], 0, 0
    for n in range(lines):
        model = COLD[(n // 10) % 2] if n % 10 == 9 else CHAT
        length = rng.randint(max(tokens // 4, 1), tokens * 7 // 4)
        if model == CHAT:
            chat, chat_tokens = chat + 1, chat_tokens + length
        rows.append(json.dumps({
            "custom_id": f"line-{n}", "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "max_tokens": length,
                     "messages": [{"role": "user", "content": f"batch line {n}"}]},
        }))  # fmt: skip
    return ("\n".join(rows) + "\n").encode(), chat, chat_tokens / max(chat, 1)


async def interactive(base: str, key: str, args: argparse.Namespace, seen: Interactive,
                      stop_at: asyncio.Event) -> None:  # fmt: skip
    """Poisson arrivals of streamed chats until `stop_at` is set."""
    url = f"{base}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}"}
    rng = random.Random(7)  # noqa: S311 (arrivals, not secrets)
    running: set[asyncio.Task[None]] = set()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(n: int) -> None:
            body = {"model": CHAT, "stream": True, "max_tokens": args.chat_tokens,
                    "messages": [{"role": "user", "content": f"interactive {n}"}]}  # fmt: skip
            began = time.monotonic()
            first: float | None = None
            async with session.post(url, json=body, headers=headers) as answer:
                seen.statuses[answer.status] += 1
                async for line in answer.content:
                    if (
                        first is None
                        and line.startswith(b"data: {")
                        and any(
                            choice.get("delta", {}).get("content")
                            for choice in json.loads(line[6:]).get("choices", [])
                        )
                    ):
                        first = time.monotonic() - began
            if first is not None and answer.status == 200:
                seen.started.append(began)
                seen.ttfts.append(first)

        n = 0
        while not stop_at.is_set():
            task = asyncio.ensure_future(one(n))
            running.add(task)
            task.add_done_callback(running.discard)
            n += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop_at.wait(), rng.expovariate(args.rate))
        await asyncio.gather(*running, return_exceptions=True)


async def run_batch(base: str, key: str, data: bytes, progress: list[tuple[float, int]]) -> Any:
    """Upload, create, and poll the batch to its end with the official client; its last state."""
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0, timeout=120)
    made = await client.files.create(file=("batch.jsonl", data), purpose="batch")
    batch = await client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")  # fmt: skip
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        await asyncio.sleep(0.5)
        batch = await client.batches.retrieve(batch.id)
        progress.append((time.monotonic(), batch.request_counts.completed if
                         batch.request_counts else 0))  # fmt: skip
    output = (await client.files.content(batch.output_file_id)).text if batch.output_file_id \
        else ""  # fmt: skip
    await client.close()
    return batch, output


async def measure(base: str, keys: dict[str, str], args: argparse.Namespace,
                  data: bytes) -> tuple[Interactive, Interactive, Any, str, list[tuple[float, int]]]:  # fmt: skip
    alone = Interactive()
    stop_at = asyncio.Event()
    print(f"interactive traffic alone, {args.seconds:.0f} s ...", flush=True)
    traffic = asyncio.ensure_future(interactive(base, keys["interactive"], args, alone, stop_at))
    await asyncio.sleep(args.seconds)
    stop_at.set()
    await traffic
    print(f"the same traffic while a batch of {args.lines} lines runs ...", flush=True)
    busy = Interactive()
    stop_at = asyncio.Event()
    traffic = asyncio.ensure_future(interactive(base, keys["interactive"], args, busy, stop_at))
    progress: list[tuple[float, int]] = [(time.monotonic(), 0)]
    cpu_before = cpu_by_group()
    try:
        batch, output = await run_batch(base, keys["batch"], data, progress)
    finally:
        stop_at.set()
        await traffic
    seconds = time.monotonic() - progress[0][0]
    used = {name: spent - cpu_before[name] for name, spent in cpu_by_group().items()}
    print("CPU cores while the batch ran: " + ", ".join(
        f"{name} {spent / seconds:.2f}" for name, spent in used.items()
    ), flush=True)  # fmt: skip
    return alone, busy, batch, output, progress


GROUPS = (
    ("bench client", "bench/batch.py"), ("batcher", "batches@"), ("web", "controlplane.web"), ("loads+control+beat", "celery"),
    ("agents and their sim engines", "nodeagent"), ("postgres", "postgres"),
    ("redis", "redis-server"),
)  # fmt: skip


def cpu_by_group() -> dict[str, float]:
    """CPU seconds of every process on this machine so far, by what it is (GROUPS)."""
    seen: dict[str, float] = dict.fromkeys([name for name, _ in GROUPS] + ["other"], 0.0)
    tick = os.sysconf("SC_CLK_TCK")
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        group = next((name for name, mark in GROUPS if mark in command), "other")
        seen[group] += (int(fields[11]) + int(fields[12])) / tick
    return seen


def when(progress: list[tuple[float, int]], done: float) -> tuple[float, int]:
    return next(((t, c) for t, c in progress if c >= done), progress[-1])


def engine_took(work: Path) -> Counter[str]:
    taken: Counter[str] = Counter()
    for log in work.glob("requests-*.jsonl"):
        for row in log.read_text().splitlines():
            prompt = json.loads(row)["prompt"]
            if "batch line " in prompt:
                taken[prompt] += 1
    return taken


def shell(code: str, env: dict[str, str]) -> str:
    """`manage` that says what failed."""
    try:
        return manage(code, env)
    except subprocess.CalledProcessError as failed:
        raise SystemExit(f"manage.py shell failed:\n{failed.stderr}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=10000)
    parser.add_argument("--seconds", type=float, default=30.0, help="the baseline phase")
    parser.add_argument("--rate", type=float, default=20.0, help="interactive requests/s")
    parser.add_argument("--seqs", type=int, default=24, help="each engine's max_num_seqs")
    parser.add_argument("--ttft-ms", type=float, default=50.0)
    parser.add_argument("--tpot-ms", type=float, default=10.0)
    parser.add_argument("--chat-tokens", type=int, default=32)
    parser.add_argument("--line-tokens", type=int, default=32)
    parser.add_argument("--concurrency", type=int, default=96, help="BATCH_CONCURRENCY")
    parser.add_argument("--reserve-percent", type=float, default=10.0,
                        help="the agents' --batch-reserve-percent")  # fmt: skip
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL", ""))
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/14")
    parser.add_argument("--quick", action="store_true", help="a small batch (CI)")
    args = parser.parse_args()
    if args.quick:
        args.lines, args.seconds, args.rate = 300, 4.0, 5.0

    work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-batch-"))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = environment(args, work, port)
    fleet = subprocess.Popen([sys.executable, "-m", "controlplane.fleet"], cwd=ROOT, env=env,
                             stdout=(work / "fleet.log").open("wb"), stderr=subprocess.STDOUT,
                             start_new_session=True)  # fmt: skip
    agents: list[subprocess.Popen[bytes]] = []
    try:
        # A web process's first answers may take seconds.
        wait_for(lambda: answers(f"{base}/healthz", timeout=10), 120, "the control plane")
        log = work / "fleet.log"
        wait_for(lambda: log.read_text(errors="replace").count("ready.") >= 3, 120, "the workers")
        agents = start_agents(args, env, work, base)
        count = COUNT.format(chat=CHAT)
        wait_for(lambda: shell(count, env).split()[0] == str(AGENTS), 60, "the agents")
        keys = json.loads(shell(SETUP.format(checkpoint=str(work / "tiny"), chat=CHAT,
                                              cold=COLD, agents=AGENTS), env))  # fmt: skip
        wait_for(lambda: shell(count, env).split()[1] == str(AGENTS), 60, f"{CHAT} READY")
        since = shell("from django.utils import timezone; print(timezone.now().isoformat())", env)
        data, chat_lines, mean_tokens = batch_input(args.lines, args.line_tokens)
        alone, busy, batch, output, progress = asyncio.run(measure(base, keys, args, data))
        loads = json.loads(shell(LOADS.format(since=since, models=[CHAT, *COLD]), env))
    finally:
        stop(agents)
        fleet.send_signal(signal.SIGINT)
        try:
            fleet.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(fleet.pid, signal.SIGKILL)
    try:
        report(args, work, alone, busy, batch, output, progress, chat_lines, mean_tokens, loads)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(args: argparse.Namespace, work: Path, alone: Interactive, busy: Interactive,
           batch: Any, output: str, progress: list[tuple[float, int]], chat_lines: int,
           mean_tokens: float, loads: dict[str, int]) -> None:  # fmt: skip
    counts = batch.request_counts
    if dump := os.environ.get("BENCH_DUMP"):
        Path(dump).write_text(json.dumps({"busy": list(zip(busy.started, busy.ttfts, strict=True)),
                                          "progress": progress}))  # fmt: skip
    written = Counter(json.loads(row)["custom_id"] for row in output.splitlines())
    taken = engine_took(work)
    duplicated = sum(1 for n in taken.values() if n > 1) + sum(1 for n in written.values() if n > 1)
    line_seconds = (args.ttft_ms + args.tpot_ms * (mean_tokens - 1)) / 1000
    chat_seconds = (args.ttft_ms + args.tpot_ms * (args.chat_tokens - 1)) / 1000
    (t10, c10), (t80, c80) = when(progress, 0.1 * chat_lines), when(progress, 0.8 * chat_lines)
    t_start, t_chat_done = progress[0][0], when(progress, chat_lines)[0]
    lines_per_s = (c80 - c10) / max(t80 - t10, 1e-9)
    interactive_seats = busy.rate_between(t10, t80) * chat_seconds
    idle_seats = AGENTS * args.seqs - interactive_seats
    share = lines_per_s * line_seconds / idle_seats
    baseline_p99 = p(alone.ttfts, 99)
    busy_p99 = busy.p99_between(t_start, t_chat_done)
    print(
        f"interactive alone: {len(alone.ttfts)} requests, TTFT p50 {p(alone.ttfts, 50) * 1000:.1f}"
        f" ms p99 {baseline_p99 * 1000:.1f} ms; statuses {dict(alone.statuses)}\n"
        f"while the batch ran {CHAT}'s lines ({t_chat_done - t_start:.0f} s): TTFT p50 "
        f"{busy.p_between(t_start, t_chat_done, 50) * 1000:.1f} ms p99 {busy_p99 * 1000:.1f} "
        f"ms; statuses {dict(busy.statuses)}\n"
        f"batch: {batch.status}, {counts.completed} completed, {counts.failed} failed of "
        f"{counts.total}; {lines_per_s:.1f} lines/s from 10 % to 80 % of {CHAT}'s = "
        f"{lines_per_s * line_seconds:.1f} seats of the {idle_seats:.1f} the interactive "
        f"traffic ({interactive_seats:.1f} seats) left idle of {AGENTS * args.seqs}\n"
        f"loads during the batch: {loads}"
    )
    fields = {
        "lines": args.lines,
        "completed": counts.completed,
        "failed": counts.failed,
        "duplicated": duplicated,
        "output_lines": len(written),
        "interactive_p99_ms": f"{busy_p99 * 1000:.1f}",
        "baseline_p99_ms": f"{baseline_p99 * 1000:.1f}",
        "interactive_p99_ratio": f"{busy_p99 / baseline_p99:.2f}",
        "batch_share_of_idle": f"{share:.2f}",
        "cold_starts_per_model": max(loads[m] for m in COLD),
        "chat_loads": loads[CHAT],
    }
    print("RESULT " + " ".join(f"{name}={value}" for name, value in fields.items()))


if __name__ == "__main__":
    main()
