"""Fair admission: one key's flood against another key's steady stream, on two sim engines.

    .venv/bin/python bench/fairness.py [--quick] [--seconds 20]

Two node agents, each running the sim engine in-process with max_num_seqs 8, a time to first
token of `--ttft-ms` and `--tpot-ms` per token after it; one web process in front, and two
API keys of weight 1. Key B sends a steady stream: one streamed chat request after another,
`--b-tokens` tokens each. Key A floods: `--flood` streams at once (10 x its fair share of the
fleet's 16 seats), `--a-tokens` tokens each, each worker sending its next as the last ends.

Phases, each `--seconds` long, on the same fleet:

1. B alone: B's time to first token (p50, p99) and requests completed, the baseline;
2. A floods while B keeps sending;
3. A floods in the `batch` class (X-Priority-Class: batch) while B keeps sending;
4. A alone, flooding: its tokens per second.

Then phases 1, 2 and 4 again with two web processes (GATEWAY_WEB_PROCESSES=2, each admitting
half the seats, every key's requests sent to them in turn as a load balancer's round robin
does): the trade-off of per-process shares, measured.

The same phases 1, 2 and 4 first with GATEWAY_ADMISSION=false, which is llmfleet before
admission (every request straight to an engine, whose own queue is first come, first served),
for the record and as the throughput the fleet gives one key when nothing holds it back.

RESULT fields:

- `b_p99_alone_ms`, `b_p99_with_flood_ms`: B's TTFT p99 alone and under A's flood;
- `fairness_ratio`: the second over the first (target <= 3);
- `b_completed_ratio`: B's requests completed under the flood over alone (target >= 0.9);
- `batch_flood_ratio`: B's TTFT p99 under A's batch-class flood over alone (target <= 1.5);
- `a_share_when_alone`: A's tokens per second alone with admission over without it (target
  >= 0.9: admission holds back nothing from a key that is alone);
- `shed_5xx`: answers of status 500 and up, every phase (target 0);
- `two_web_fairness_ratio`, `two_web_b_completed_ratio`, `two_web_a_share_when_alone`: the
  same with two web processes;
- `baseline_fairness_ratio`, `baseline_b_completed_ratio`: the same without admission.

`--quick` runs 3-second phases with a smaller flood, so that the test suite runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import requests
from loadgen import p
from stack import ROOT, answers, manage, start, stop

from tests.support import free_port, wait_for

ENGINES = 2
SEQS = 8
MODEL = "bench/fair"


@dataclass
class Phase:
    """What one key saw in one phase."""

    ttfts: list[float] = field(default_factory=list)
    completed: int = 0
    tokens: int = 0
    statuses: Counter[int] = field(default_factory=Counter)


class Fleet:
    """Two sim agents and a web process, with or without admission."""

    def __init__(self, env: dict[str, str], work: Path, args: argparse.Namespace, tag: str,
                 admission: bool, webs: int = 1) -> None:  # fmt: skip
        self.work, self.tag, self.webs = work, tag, webs
        self.env = env | {"GATEWAY_ADMISSION": "true" if admission else "false",
                          "GATEWAY_WEB_PROCESSES": str(webs)}  # fmt: skip
        self.args = args
        self.processes: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> Fleet:
        checkpoint = self.work / "checkpoint"
        checkpoint.mkdir(exist_ok=True)
        (checkpoint / "config.json").write_text("{}")
        rows = []
        for number in range(ENGINES):
            name, port = f"{self.tag}-{number}", free_port()
            token = manage(
                "import secrets; from agents import credentials; from agents.models import Agent; "
                f"n = secrets.token_hex(32); c = credentials.derive('{name}', n); "
                f"Agent.objects.create(agent_id='{name}', base_url='http://127.0.0.1:{port}', "
                "credential_nonce=n, credential_fingerprint=credentials.fingerprint(c)); print(c)",
                self.env,
            )  # fmt: skip
            self.processes.append(start(
                [sys.executable, "-m", "nodeagent", "--port", str(port), "--token", token,
                 "--engine", "sim", "--cache-dir", str(self.work / f"cache-{name}"),
                 "--log-level", "WARNING", "--sim-load-seconds", "0",
                 "--sim-ttft-ms", str(self.args.ttft_ms), "--sim-tpot-ms", str(self.args.tpot_ms),
                 "--sim-max-num-seqs", str(SEQS)],
                self.env, self.work / f"agent-{name}.log",
            ))  # fmt: skip
            wait_for(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 30, "an agent")  # noqa: B023
            url = requests.post(
                f"http://127.0.0.1:{port}/load_model",
                json={"model_id": f"{MODEL}-{self.tag}", "source": checkpoint.as_uri(),
                      "engine": {"args": []}},
                headers={"Authorization": f"Bearer {token}"}, timeout=30,
            ).json()["inference_endpoint_url"]  # fmt: skip
            rows.append((name, url))
        # The rows as a load's answer writes them: READY, with the engine's max_num_seqs.
        manage(
            "from agents.models import Agent, Model, Placement\n"
            f"m = Model.objects.create(model_id='{MODEL}-{self.tag}', source='file:///x', "
            f"max_replicas={ENGINES})\n"
            f"for name, url in {rows!r}:\n"
            "    Placement.objects.create(agent=Agent.objects.get(agent_id=name), model=m, "
            f"state='READY', cache_level='GPU_RESIDENT', inference_endpoint_url=url, "
            f"max_num_seqs={SEQS})\n"
            "print('ok')",
            self.env,
        )
        self.ports = [free_port() for _ in range(self.webs)]
        for n, port in enumerate(self.ports):
            self.processes.append(start(
                [sys.executable, "-m", "controlplane.web", "--port", str(port)],
                self.env, self.work / f"web-{self.tag}-{n}.log",
            ))  # fmt: skip
            wait_for(lambda: answers(f"http://127.0.0.1:{port}/healthz"), 30, "a web process")  # noqa: B023
        return self

    def __exit__(self, *exc: object) -> None:
        stop(self.processes)

    @property
    def urls(self) -> list[str]:
        """Each web process's chat endpoint: requests go to them in turn, as a load balancer's
        round robin sends them."""
        return [f"http://127.0.0.1:{port}/v1/chat/completions" for port in self.ports]

    @property
    def model(self) -> str:
        return f"{MODEL}-{self.tag}"


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict[str, object],
                     headers: dict[str, str], seen: Phase, until: float) -> None:  # fmt: skip
    """One streamed request; its TTFT, tokens and completion count only if it started before
    `until` (the phase's end)."""
    began = time.monotonic()
    first: float | None = None
    tokens = 0
    async with session.post(url, json=body, headers=headers) as answer:
        seen.statuses[answer.status] += 1
        if answer.status != 200:
            await answer.read()
            return
        async for line in answer.content:
            if not line.startswith(b"data: {"):
                continue  # comments while held, blank lines, [DONE]
            event = json.loads(line[6:])
            if event.get("error"):  # an error event in place of the answer: counted a failure
                seen.statuses[599] += 1
                return
            if any(choice.get("delta", {}).get("content") for choice in event.get("choices", [])):
                tokens += 1
                if first is None:
                    first = time.monotonic() - began
    if began < until:
        seen.completed += 1
        seen.tokens += tokens
        if first is not None:
            seen.ttfts.append(first)


async def sender(urls: list[str], model: str, key: str, tokens: int, workers: int,
                 seconds: float, extra: dict[str, str] | None = None) -> Phase:  # fmt: skip
    """`workers` closed loops of streamed requests for `seconds`; what the key saw."""
    seen = Phase()
    headers = {"Authorization": f"Bearer {key}", **(extra or {})}
    until = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        sent = 0

        async def loop(number: int) -> None:
            nonlocal sent
            while time.monotonic() < until:
                body = {"model": model, "stream": True, "max_tokens": tokens,
                        "messages": [{"role": "user", "content": f"request {number}"}]}  # fmt: skip
                sent += 1
                await one_stream(session, urls[sent % len(urls)], body, headers, seen, until)

        tasks = [asyncio.ensure_future(loop(n)) for n in range(workers)]
        await asyncio.sleep(seconds)
        # The phase is over: what is still running or held is let go (the client leaves).
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return seen


async def phase(fleet: Fleet, keys: dict[str, str], args: argparse.Namespace, flood: bool,
                steady: bool, batch: bool = False) -> tuple[Phase, Phase]:  # fmt: skip
    """B's steady stream and A's flood (each when asked), for one phase."""
    urls, model = fleet.urls, fleet.model
    quiet = Phase()
    b = sender(urls, model, keys["b"], args.b_tokens, 1, args.seconds) if steady else None
    extra = {"X-Priority-Class": "batch"} if batch else None
    a = (sender(urls, model, keys["a"], args.a_tokens, args.flood, args.seconds, extra)
         if flood else None)  # fmt: skip
    if a is not None and b is not None:
        a_task = asyncio.ensure_future(a)
        await asyncio.sleep(1.0)  # the flood is on before B starts counting
        b_seen = await b
        a_seen = await a_task
    else:
        a_seen = await a if a is not None else quiet
        b_seen = await b if b is not None else quiet
    await asyncio.sleep(1.0)  # what the phase let go has left the engines
    return a_seen, b_seen


def run_fleet(fleet: Fleet, keys: dict[str, str], args: argparse.Namespace,
              with_batch: bool = False, a_alone: bool = True) -> dict[str, tuple[Phase, Phase]]:  # fmt: skip
    phases = {"alone": (False, True, False), "flood": (True, True, False)}
    if with_batch:
        phases["batch"] = (True, True, True)
    if a_alone:
        phases["a_alone"] = (True, False, False)
    seen = {}
    for name, (flood, steady, batch) in phases.items():
        print(f"  {fleet.tag}: {name} ...", flush=True)
        seen[name] = asyncio.run(phase(fleet, keys, args, flood, steady, batch))
    return seen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="each phase")
    parser.add_argument("--flood", type=int, default=80, help="A's streams at once")
    parser.add_argument("--a-tokens", type=int, default=64)
    parser.add_argument("--b-tokens", type=int, default=16)
    parser.add_argument("--ttft-ms", type=float, default=30.0)
    parser.add_argument("--tpot-ms", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="short phases (CI)")
    args = parser.parse_args()
    if args.quick:
        args.seconds, args.flood = 3.0, 24

    work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-fairness-"))
    env = {k: v for k, v in os.environ.items()
           if k not in {"DATABASE_URL", "REDIS_URL", "AGENT_TOKEN", "SECRET_KEY"}}  # fmt: skip
    env.update(VAR_DIR=str(work / "var"), AGENT_TOKEN="bench-token", SECRET_KEY="bench",
               LOG_LEVEL="WARNING", PYTHONPATH="")  # fmt: skip
    subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], cwd=ROOT, env=env, check=True)
    create = (
        "from controlplane.gateway.actions import create_api_key; print(create_api_key('{}')[1])"
    )
    keys = {name: manage(create.format(name), env) for name in ("a", "b")}
    try:
        with Fleet(env, work, args, "before", admission=False) as fleet:
            before = run_fleet(fleet, keys, args, with_batch=False)
        with Fleet(env, work, args, "after", admission=True) as fleet:
            after = run_fleet(fleet, keys, args, with_batch=True)
        with Fleet(env, work, args, "twoweb", admission=True, webs=2) as fleet:
            after.update(
                {f"2web_{name}": seen for name, seen in run_fleet(fleet, keys, args).items()}
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(before, after, args)


def p99_ms(seen: Phase) -> float:
    return p(seen.ttfts, 99) * 1000 if seen.ttfts else float("nan")


def report(before: dict[str, tuple[Phase, Phase]], after: dict[str, tuple[Phase, Phase]],
           args: argparse.Namespace) -> None:  # fmt: skip
    rows = []
    for label, runs in (("before (no admission)", before), ("admission", after)):
        for name, (a, b) in runs.items():
            rows.append(
                f"{label:24} {name:8} B: {len(b.ttfts):4} done, TTFT p50 "
                f"{p(b.ttfts, 50) * 1000 if b.ttfts else float('nan'):8.1f} ms p99 "
                f"{p99_ms(b):8.1f} ms | A: {a.completed:5} done, "
                f"{a.tokens / args.seconds:7.1f} tok/s | statuses "
                f"{dict(a.statuses + b.statuses)}"
            )
    print("\n".join(rows))
    alone, flood = after["alone"][1], after["flood"][1]
    batch = after["batch"][1]
    old_alone, old_flood = before["alone"][1], before["flood"][1]
    shed_5xx = sum(
        count for runs in (before, after) for a, b in runs.values()
        for status, count in (a.statuses + b.statuses).items() if status >= 500
    )  # fmt: skip
    fields = {
        "b_p99_alone_ms": f"{p99_ms(alone):.1f}",
        "b_p99_with_flood_ms": f"{p99_ms(flood):.1f}",
        "fairness_ratio": f"{p99_ms(flood) / p99_ms(alone):.2f}",
        "b_completed_ratio": f"{flood.completed / max(alone.completed, 1):.2f}",
        "batch_flood_ratio": f"{p99_ms(batch) / p99_ms(alone):.2f}",
        "a_share_when_alone": (
            f"{after['a_alone'][0].tokens / max(before['a_alone'][0].tokens, 1):.2f}"
        ),
        "shed_5xx": str(shed_5xx),
        "two_web_fairness_ratio": f"{p99_ms(after['2web_flood'][1]) / p99_ms(alone):.2f}",
        "two_web_b_completed_ratio": (
            f"{after['2web_flood'][1].completed / max(alone.completed, 1):.2f}"
        ),
        "two_web_a_share_when_alone": (
            f"{after['2web_a_alone'][0].tokens / max(before['a_alone'][0].tokens, 1):.2f}"
        ),
        "baseline_fairness_ratio": f"{p99_ms(old_flood) / p99_ms(old_alone):.2f}",
        "baseline_b_completed_ratio": f"{old_flood.completed / max(old_alone.completed, 1):.2f}",
    }
    print("RESULT " + " ".join(f"{name}={value}" for name, value in fields.items()))


if __name__ == "__main__":
    main()
