"""Standby engines with real vLLM on the CPU, through the whole fleet: a cold request served by
a standby with its phases streamed in order, the engine that was a standby stopping
completely, a standby killed with SIGKILL replaced, and arguments a standby cannot take
starting plainly."""

from __future__ import annotations

import io
import os
import signal
import subprocess
from contextlib import ExitStack

import pytest
import requests

from agents import actions
from agents.choices import CacheLevel, LoadEventKind, LoadOutcome
from agents.models import Agent, LoadEvent, Placement
from nodeagent import tinymodel
from nodeagent.store.publish import publish
from tests.e2e.agent_process import AgentProcess, engine_python, group_members
from tests.e2e.fleet import running_control_plane
from tests.e2e.test_vllm_agent import CPU_ARGS
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

READY = 'llmfleet_agent_standby_engines{state="ready"}'
# vLLM's old entry point serves with one API server whatever this says; a standby still
# refuses it (`vllm serve` would start API servers in processes of their own).
NOT_FOR_A_STANDBY = ["--api-server-count", "2"]


def standbys_of(agent: AgentProcess) -> list[int]:
    """Pids of the agent's standby engines that wait for a model."""
    out = subprocess.run(
        ["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True, text=True
    ).stdout
    found = []
    for line in out.splitlines():
        pid, ppid, args = line.split(None, 2)
        if int(ppid) == agent.process.pid and "llmfleet standby engine: ready" in args:
            found.append(int(pid))
    return found


def cold_stream(url: str, key: str, model: str) -> tuple[list[str], str]:
    """A streamed chat completion: its SSE comments, and the text."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello"}],
            "max_tokens": 4, "stream": True, "ignore_eos": True}  # fmt: skip
    comments, data = [], []
    with requests.post(
        f"{url}/v1/chat/completions", json=body, stream=True, timeout=300,
        headers={"Authorization": f"Bearer {key}"},
    ) as response:  # fmt: skip
        assert response.status_code == 200, response.text
        for line in response.iter_lines():
            if line.startswith(b":"):
                comments.append(line.decode())
            elif line.startswith(b"data: {"):
                data.append(line)
    assert data, comments
    return comments, b"".join(data).decode()


def latest_load(model_id: str) -> LoadEvent:
    return LoadEvent.objects.filter(kind=LoadEventKind.LOAD, model__model_id=model_id).latest(
        "queued_at"
    )


def test_standby_engines_through_the_fleet(settings, tmp_path, azurite):
    tiny = tinymodel.build(tmp_path / "tiny")
    publish(tiny, "azure://models/org/tiny", azurite.environ(), stream=io.StringIO())
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        # 1 MiB ranges at 0.5 MB/s: the 1.9 MB download lasts ~2 s, long enough to be seen.
        agent = plane.agent(
            stack, tmp_path, "cpu-1", "--engine", "vllm", "--engine-python", engine_python(),
            "--download-range-mib", "1", "--download-limit-mb-s", "0.5",
            extra_env=azurite.environ(),
        )  # fmt: skip
        wait_for(lambda: Agent.objects.filter(agent_id="cpu-1").exists(), 30, "registration")
        for name in ("org/tiny", "org/plain"):
            actions.register_catalog_model(
                name, "azure://models/org/tiny", size_bytes=1,
                engine_args=CPU_ARGS + (NOT_FOR_A_STANDBY if name == "org/plain" else []),
            )  # fmt: skip
        _, key = make_api_key("standby")
        wait_for(lambda: agent.metric(READY) == 1, 300, "a standby engine")
        [standby] = standbys_of(agent)

        # A cold request: served by the standby, its phases streamed in order.
        comments, text = cold_stream(plane.url, key, "org/tiny")
        assert text
        phases = [c.removeprefix(": loading org/tiny: ") for c in comments if ": " in c[2:]]
        downloading = [n for n, p in enumerate(phases) if p.startswith("downloading")]
        engine = phases.index("starting the engine (standby)")
        assert downloading, comments
        assert max(downloading) < engine, comments
        load = latest_load("org/tiny")
        assert (load.outcome, load.engine_start, load.engine_start_note) == (
            LoadOutcome.SUCCEEDED, "standby", ""
        )  # fmt: skip
        assert agent.metric('llmfleet_agent_engine_starts_total{engine="vllm",outcome="ready",'
                            'start="standby"}') == 1  # fmt: skip

        # The engine that was a standby stops completely: no process of its group is left.
        assert group_members(standby) != []
        placement = Placement.objects.get(model__model_id="org/tiny")
        actions.unload(placement, CacheLevel.NVME_CACHED)
        wait_for(
            lambda: Placement.objects.get(pk=placement.pk).cache_level == CacheLevel.NVME_CACHED,
            60, "the unload",
        )  # fmt: skip
        wait_for(lambda: group_members(standby) == [], 30, "the engine's process group to end")

        # Its successor starts once the engine is up; one killed with SIGKILL is replaced.
        wait_for(lambda: len(standbys_of(agent)) == 1, 300, "the successor standby")
        [successor] = standbys_of(agent)
        assert successor != standby
        os.kill(successor, signal.SIGKILL)
        wait_for(lambda: agent.metric("llmfleet_agent_standby_deaths_total") == 1, 30, "a death")
        wait_for(lambda: standbys_of(agent) not in ([], [successor]), 300, "a replacement standby")
        wait_for(lambda: agent.metric(READY) == 1, 60, "the replacement to be ready")
        # ...and the next load still works, on the replacement.
        _, text = cold_stream(plane.url, key, "org/tiny")
        assert text
        assert latest_load("org/tiny").engine_start == "standby"

        # Arguments a standby cannot take: a plain start, which says why.
        comments, text = cold_stream(plane.url, key, "org/plain")
        assert text
        load = latest_load("org/plain")
        assert (load.outcome, load.engine_start) == (LoadOutcome.SUCCEEDED, "plain")
        assert load.engine_start_note.startswith("--api-server-count 2")
        assert any("starting the engine (plain start: --api-server-count 2" in c
                   for c in comments), comments  # fmt: skip
        # The standby was not used for it: it still waits for a model.
        wait_for(lambda: agent.metric(READY) == 1, 300, "the standby")
        assert agent.metric('llmfleet_agent_engine_starts_total{engine="vllm",outcome="ready",'
                            'start="plain"}') == 1  # fmt: skip
