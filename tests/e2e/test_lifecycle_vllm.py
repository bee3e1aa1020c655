"""The main path with real vLLM on the CPU: a checkpoint published to Azure Blob (Azurite),
a cold request that downloads and starts it, keep-alive expiry that stops the engine, and a
second cold start from the agent's local cache."""

from __future__ import annotations

import io
import os
import signal
from contextlib import ExitStack
from datetime import timedelta

import openai
import pytest

from agents import actions
from agents.choices import CacheLevel, LoadEventKind, LoadOutcome, PlacementState
from agents.models import Agent, LoadEvent, Placement
from nodeagent import tinymodel
from nodeagent.store.publish import publish
from tests.e2e.agent_process import engine_python, group_members, processes_mentioning
from tests.e2e.fleet import running_control_plane
from tests.e2e.test_vllm_agent import CPU_ARGS
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_cold_start_keep_alive_and_a_second_cold_start_from_the_local_cache(
    settings, tmp_path, azurite
):
    tiny = tinymodel.build(tmp_path / "tiny")
    publish(tiny, "azure://models/org/tiny", azurite.environ(), stream=io.StringIO())
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        agent = plane.agent(
            stack, tmp_path, "cpu-1", "--engine", "vllm", "--engine-python", engine_python(),
            extra_env=azurite.environ(),
        )  # fmt: skip
        wait_for(lambda: Agent.objects.filter(agent_id="cpu-1").exists(), 30, "registration")
        actions.register_catalog_model(
            "org/tiny", "azure://models/org/tiny", size_bytes=1, engine_args=CPU_ARGS,
            keep_alive=timedelta(seconds=3),
        )  # fmt: skip
        _, raw_key = make_api_key("vllm")
        client = openai.OpenAI(
            base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0, timeout=300
        )

        def streamed() -> str:
            stream = client.chat.completions.create(
                model="org/tiny", messages=[{"role": "user", "content": "Hello"}],
                max_tokens=6, stream=True, extra_body={"ignore_eos": True},
            )  # fmt: skip
            return "".join(c.choices[0].delta.content or "" for c in stream if c.choices)

        assert streamed()
        first = LoadEvent.objects.get(kind=LoadEventKind.LOAD)
        assert first.outcome == LoadOutcome.SUCCEEDED
        assert first.download_seconds is not None
        assert first.engine_start_seconds is not None
        assert first.from_level == CacheLevel.NONE

        def engines() -> list[tuple[int, int, str]]:
            return [p for p in processes_mentioning(str(agent.cache_dir)) if "api_server" in p[2]]

        assert len(engines()) == 1
        # vLLM's CPU build cannot sleep: the step down from the GPU stops the engine.
        wait_for(
            lambda: Placement.objects.get().cache_level == CacheLevel.NVME_CACHED,
            60,
            "keep-alive to stop the engine",
        )
        wait_for(lambda: not engines(), 30, "the engine's processes to end")
        assert Placement.objects.get().state == PlacementState.UNLOADED

        assert streamed()
        second = LoadEvent.objects.filter(kind=LoadEventKind.LOAD).latest("queued_at")
        assert second.outcome == LoadOutcome.SUCCEEDED
        assert second.from_level == CacheLevel.NVME_CACHED
        assert second.download_seconds is None  # nothing downloaded the second time
        assert second.bytes_downloaded == 0


def test_a_request_after_the_engine_core_was_killed_is_answered_not_lost(settings, tmp_path):
    """vLLM's API server outlives an EngineCore killed as the OOM killer or a GPU fault
    would, and answers 500 (EngineDeadError) to everything. That 500 is no verdict on the
    request: the agent says its engine is unreachable, the gateway fails the request over
    (here to a new engine, a cold start), and the client gets its answer."""
    tiny = tinymodel.build(tmp_path / "tiny")
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        agent = plane.agent(
            stack, tmp_path, "cpu-1", "--engine", "vllm", "--engine-python", engine_python()
        )
        wait_for(lambda: Agent.objects.filter(agent_id="cpu-1").exists(), 30, "registration")
        actions.register_catalog_model(
            "org/tiny", tiny.as_uri(), size_bytes=1, engine_args=CPU_ARGS
        )
        _, raw_key = make_api_key("vllm")
        client = openai.OpenAI(
            base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0, timeout=300
        )

        def ask() -> str:
            answer = client.chat.completions.create(
                model="org/tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=4,
                extra_body={"ignore_eos": True},
            )  # fmt: skip
            return answer.choices[0].message.content or ""

        assert ask()
        [(leader, group, _)] = [
            p for p in processes_mentioning(str(agent.cache_dir)) if "api_server" in p[2]
        ]
        core = [pid for pid in group_members(group) if pid != leader]
        assert core  # vLLM's EngineCore (and any worker), forked or spawned by the server
        for pid in core:
            os.kill(pid, signal.SIGKILL)
        assert ask()  # not a 500: answered by the engine the failover started
        failed = Placement.objects.get()
        assert failed.state == PlacementState.READY
        loads = LoadEvent.objects.filter(kind=LoadEventKind.LOAD).order_by("queued_at")
        assert [load.outcome for load in loads] == [LoadOutcome.SUCCEEDED] * 2
        assert "engine died" in agent.log() or "engine_unreachable" in plane.log("web")
