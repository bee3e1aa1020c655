"""The control plane at fleet scale: 1,000 sim agents, heartbeat polls and routing decisions.

    .venv/bin/python bench/fleet.py [--agents 1000] [--models 50] [--rounds 5]

Starts `python -m nodeagent.simfleet` with N sim agents in one process (each a
full AgentServer on its own port), gives each one model to serve (a real
`/load_model` each, through the sim engine), and writes the matching Agent,
Model and READY Placement rows. Then, in this process with the control plane's
own code and database (embedded SQLite in a temporary VAR_DIR, or DATABASE_URL
when set):

- poll: what one beat interval's `agents.tasks.poll_heartbeats` does, timed
  per round: every agent's heartbeat over HTTP at once, then `apply_heartbeats`
  (bulk writes and reconciliation of every placement);
- route: the gateway's decision for one request, timed 2,000 times with the
  replica cache off (the indexed READY query every time, the worst case) and
  on: `Cache.ready_placements` + `Router.pick`.

The baseline is the target of the issue: polling must fit in the heartbeat
interval (5 s) and a decision in 2 ms; each line prints the ratio. Ends with
`RESULT agents=… poll_s=… route_p99_ms=… route_query_p99_ms=…`: poll_s the
slowest round, route_p99_ms the decision as the gateway makes it (replicas
remembered for 1 s and then refreshed in the background, so no request waits
for the query), route_query_p99_ms the decision when every one runs it.
BENCH_PROFILE=1 prints a profile of the second round's database writes.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

INTERVAL_TARGET_S = 5.0
ROUTE_TARGET_MS = 2.0


def p(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(int(q * len(ordered)), len(ordered) - 1)]


def answers(url: str) -> bool:
    import requests

    try:
        return requests.get(url, timeout=1).ok
    except requests.RequestException:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--models", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="20 agents, 2 rounds (CI)")
    options = parser.parse_args()
    if options.quick:
        options.agents, options.models, options.rounds = 20, 4, 2
    work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-fleet-"))
    os.environ.setdefault("VAR_DIR", str(work / "var"))
    os.environ.setdefault("GATEWAY_CACHE_SECONDS", "0")
    os.environ["DJANGO_SETTINGS_MODULE"] = "controlplane.settings"
    import django

    django.setup()
    from django.core.management import call_command

    from tests.support import free_port_block, wait_for

    call_command("migrate", verbosity=0)
    base = free_port_block(options.agents)
    source = work / "checkpoint"
    source.mkdir()
    (source / "config.json").write_text("{}")
    tokens = enrol(options.agents, base, work / "tokens")
    print(f"starting {options.agents} sim agents on ports {base}..{base + options.agents - 1}")
    env = {k: v for k, v in os.environ.items() if k != "AGENT_TOKEN"}
    log = (work / "simfleet.log").open("wb")
    fleet = subprocess.Popen(
        [sys.executable, "-m", "nodeagent.simfleet", "--count", str(options.agents),
         "--base-port", str(base), "--cache-root", str(work / "agents"), "--token-dir",
         str(tokens), "--log-level", "WARNING", "--sim-load-seconds", "0"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        last = f"http://127.0.0.1:{base + options.agents - 1}/healthz"
        wait_for(lambda: answers(last) or fleet.poll() is not None, 300, "the sim agents")
        if fleet.poll() is not None:
            raise SystemExit((work / "simfleet.log").read_text())
        run(options, source.as_uri())
    finally:
        fleet.terminate()
        fleet.wait(timeout=60)


def enrol(count: int, base: int, folder: Path) -> Path:
    """Agent rows for the sim agents, each enrolled with a credential of its own (as
    registration gives one), written where the sim fleet's agents read their tokens."""
    import secrets

    from agents import credentials
    from agents.models import Agent

    folder.mkdir()
    rows = []
    for n in range(count):
        agent_id, nonce = f"sim-{n}", secrets.token_hex(32)
        credential = credentials.derive(agent_id, nonce)
        (folder / agent_id).write_text(credential)
        rows.append(Agent(agent_id=agent_id, base_url=f"http://127.0.0.1:{base + n}",
                          credential_nonce=nonce,
                          credential_fingerprint=credentials.fingerprint(credential)))  # fmt: skip
    Agent.objects.bulk_create(rows)
    return folder


def run(options: argparse.Namespace, source: str) -> None:
    import aiohttp
    from django.conf import settings

    from agents import actions, agent_client
    from agents.choices import CacheLevel, PlacementState
    from agents.models import Agent, Model, Placement
    from controlplane.gateway.state import GatewayState, forget_cached

    state = GatewayState()
    router = state.router

    enrolled = {agent.agent_id: agent for agent in Agent.objects.all()}
    fleet = [enrolled[f"sim-{n}"] for n in range(options.agents)]
    urls = [agent.base_url for agent in fleet]
    models = [f"bench/m{n}" for n in range(options.models)]
    Model.objects.bulk_create(Model(model_id=m, source=source) for m in models)

    async def load_all() -> None:
        limit = asyncio.Semaphore(64)
        async with aiohttp.ClientSession() as session:

            async def load(n: int) -> None:
                body = {"model_id": models[n % len(models)], "source": source}
                async with limit, session.post(
                    f"{urls[n]}/load_model", json=body,
                    headers={"Authorization": f"Bearer {fleet[n].credential}"},
                ) as response:  # fmt: skip
                    assert response.status == 200, await response.text()

            await asyncio.gather(*(load(n) for n in range(len(urls))))

    started = time.monotonic()
    asyncio.run(load_all())
    print(f"{options.agents} models loaded on the sim agents in {time.monotonic() - started:.1f} s")
    by_id = dict(Model.objects.values_list("model_id", "pk"))
    agents = dict(Agent.objects.values_list("agent_id", "pk"))
    Placement.objects.bulk_create(
        Placement(
            agent_id=agents[f"sim-{n}"], model_id=by_id[models[n % len(models)]],
            state=PlacementState.READY, cache_level=CacheLevel.GPU_RESIDENT,
            inference_endpoint_url=f"{urls[n]}/models/{models[n % len(models)]}",
        )
        for n in range(len(urls))
    )  # fmt: skip

    # The sim agents run without a control plane: each takes the credential it was enrolled
    # with, as the control plane calls it.
    targets = [agent_client.HeartbeatTarget(a.pk, a.base_url, a.credential) for a in fleet]
    polls, http_parts = [], []
    for round_number in range(options.rounds):
        started = time.monotonic()
        results = asyncio.run(
            agent_client.poll_heartbeats(targets, seconds=settings.HEARTBEAT_TIMEOUT_SECONDS)
        )
        polled = time.monotonic()
        if os.environ.get("BENCH_PROFILE") and round_number == 1:
            import cProfile
            import pstats

            profiler = cProfile.Profile()
            profiler.runcall(actions.apply_heartbeats, results)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(25)
        else:
            actions.apply_heartbeats(results)
        done = time.monotonic()
        missed = sum(result.response is None for result in results)
        polls.append(done - started)
        http_parts.append(polled - started)
        print(f"poll round {round_number + 1}: {done - started:.2f} s "
              f"(HTTP {polled - started:.2f} s, database {done - polled:.2f} s, {missed} missed)")  # fmt: skip
    ready = Placement.objects.filter(state=PlacementState.READY).count()
    print(f"after the polls: {ready} READY placements of {options.agents}")
    if ready < options.agents:  # every agent answered: a replica lost is the bench broken
        states = Agent.objects.filter(state__in=["DEGRADED", "OFFLINE"])
        raise SystemExit(f"replicas lost in the polls; agents missing heartbeats, e.g. "
                         f"{list(states.values_list('agent_id', 'state')[:3])}")  # fmt: skip

    model = Model.objects.get(model_id=models[0])

    async def decide(count: int) -> list[float]:
        timings = []
        for _ in range(count):
            started = time.perf_counter()
            placements = await state.cache.ready_placements(model)
            chosen = router.pick(placements, None)
            assert chosen is not None
            timings.append((time.perf_counter() - started) * 1000)
        return timings

    settings.GATEWAY_CACHE_SECONDS = 0
    uncached = asyncio.run(decide(2000))
    settings.GATEWAY_CACHE_SECONDS = 5
    forget_cached()
    cached = asyncio.run(decide(2000))
    replicas = len(asyncio.run(state.cache.ready_placements(model)))
    worst = max(polls)
    print()
    print(f"{'measure':<36}{'p50':>10}{'p99':>10}{'target':>10}{'ratio':>8}")
    print(
        f"{'heartbeat poll, whole round (s)':<36}{statistics.median(polls):>10.2f}"
        f"{worst:>10.2f}{INTERVAL_TARGET_S:>10.1f}{worst / INTERVAL_TARGET_S:>8.2f}"
    )
    print(
        f"{'  of which HTTP (s)':<36}{statistics.median(http_parts):>10.2f}{max(http_parts):>10.2f}"
    )
    route_p99 = p(uncached, 0.99)
    print(
        f"{f'route, {replicas} replicas, query (ms)':<36}{p(uncached, 0.5):>10.3f}"
        f"{route_p99:>10.3f}{ROUTE_TARGET_MS:>10.1f}{route_p99 / ROUTE_TARGET_MS:>8.2f}"
    )
    print(
        f"{f'route, {replicas} replicas, cached (ms)':<36}{p(cached, 0.5):>10.3f}"
        f"{p(cached, 0.99):>10.3f}{ROUTE_TARGET_MS:>10.1f}{p(cached, 0.99) / ROUTE_TARGET_MS:>8.2f}"
    )
    print(
        f"\nRESULT agents={options.agents} poll_s={worst:.2f} "
        f"route_p99_ms={p(cached, 0.99):.3f} route_query_p99_ms={route_p99:.3f}"
    )


if __name__ == "__main__":
    main()
