"""The node agent with the real vLLM engine on the CPU and the tiny checkpoint."""

from __future__ import annotations

import io
import os
import signal
import socket
from pathlib import Path

import openai
import pytest

from nodeagent import tinymodel
from nodeagent.store.publish import publish
from tests.clouds import Moto
from tests.e2e.agent_process import engine_python as find_engine_python
from tests.e2e.agent_process import (
    group_members,
    processes_mentioning,
    running_agent,
)
from tests.support import wait_for

pytestmark = pytest.mark.e2e

# What vLLM's CPU build needs for a fast start (../shared/FACTS.md).
CPU_ARGS = [
    "--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
    "--kv-cache-memory-bytes", "64M", "--max-num-seqs", "8", "--shutdown-timeout", "10",
]  # fmt: skip
LOAD_TIMEOUT = 300


@pytest.fixture(scope="module")
def engine_python() -> str:
    return find_engine_python()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("checkpoint") / "tiny")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def engine_of(cache_dir: Path) -> tuple[int, int]:
    """(pid, port) of the api_server serving from this agent's cache."""
    [(pid, _, args)] = [
        found for found in processes_mentioning(str(cache_dir)) if "api_server" in found[2]
    ]
    words = args.split()
    return pid, int(words[words.index("--port") + 1])


def test_publish_load_stream_unload_and_load_again_from_the_cache(
    tmp_path, engine_python, tiny, azurite
):
    # The whole path of a checkpoint: published to Azure Blob (Azurite), downloaded by the agent.
    publish(tiny, "azure://models/org/tiny", azurite.environ(), stream=io.StringIO())
    agent_args = ("--engine", "vllm", "--engine-python", engine_python)
    with running_agent(tmp_path, *agent_args, extra_env=azurite.environ()) as agent:
        load = {
            "model_id": "org/tiny",
            "source": "azure://models/org/tiny",
            "engine": {"args": CPU_ARGS},
        }
        response = agent.post("/load_model", load, timeout=LOAD_TIMEOUT)
        assert response.status_code == 200, response.text
        loaded = response.json()
        assert (loaded["cache_state"], loaded["cache_level"]) == ("READY", "GPU_RESIDENT")
        assert loaded["timings"]["files_cached"] is False

        # A streaming chat completion through the agent's proxy, with the official client.
        client = openai.OpenAI(
            base_url=f"{loaded['inference_endpoint_url']}/v1", api_key=agent.token
        )
        stream = client.chat.completions.create(
            model="org/tiny",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},  # random weights: exactly max_tokens tokens
        )
        chunks = list(stream)
        assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) >= 2
        assert chunks[-1].usage is not None
        assert chunks[-1].usage.completion_tokens == 8

        heartbeat = agent.heartbeat()
        model = next(m for m in heartbeat["models"] if m["model_id"] == "org/tiny")
        assert (model["cache_state"], model["engine"]) == ("READY", "vllm")
        assert model["kv_cache_usage"] is not None  # read from vLLM's own /metrics
        assert heartbeat["gpus"] == []

        pid, port = engine_of(agent.cache_dir)
        pgid = os.getpgid(pid)
        response = agent.post(
            "/unload_model", {"model_id": "org/tiny", "to": "NVME_CACHED"}, timeout=60
        )
        assert response.status_code == 200, response.text
        assert response.json()["cache_level"] == "NVME_CACHED"
        assert [
            found for found in processes_mentioning(str(agent.cache_dir)) if found[1] == pgid
        ] == []
        assert not port_open(port)

        weights = next((agent.cache_dir / "models").glob("*/model.safetensors"))
        before = weights.stat()
        response = agent.post("/load_model", load, timeout=LOAD_TIMEOUT)
        assert response.status_code == 200, response.text
        timings = response.json()["timings"]
        assert (timings["files_cached"], timings["download_seconds"]) == (True, None)
        after = weights.stat()
        assert (after.st_ino, after.st_mtime_ns) == (
            before.st_ino,
            before.st_mtime_ns,
        )  # not copied

        # kill -9 of the engine: the next heartbeat says FAILED, with the exit status.
        pid, _ = engine_of(agent.cache_dir)
        os.kill(pid, signal.SIGKILL)

        def failed() -> bool:
            model = next(m for m in agent.heartbeat()["models"] if m["model_id"] == "org/tiny")
            return model["cache_state"] == "FAILED"

        wait_for(failed, 15, "the heartbeat to report FAILED")
        model = next(m for m in agent.heartbeat()["models"] if m["model_id"] == "org/tiny")
        assert "exit status -9" in model["error"]
        wait_for(lambda: group_members(pid) == [], 15, "the dead engine's group to be gone")

    assert agent.process.returncode == 0, agent.log()
    assert group_members(pid) == []


def test_an_engine_that_cannot_start_fails_the_load_with_its_log_tail(
    tmp_path, engine_python, tiny
):
    with running_agent(tmp_path, "--engine", "vllm", "--engine-python", engine_python) as agent:
        # An allowed flag with a value vLLM refuses (a flag off the allow-list never gets
        # this far: 400 engine_args_refused, tests/nodeagent/test_engineargs.py).
        args = ["--dtype", "no-such-dtype"]
        load = {"model_id": "bad", "source": tiny.as_uri(), "engine": {"args": args}}
        response = agent.post("/load_model", load, timeout=LOAD_TIMEOUT)
        assert response.status_code == 502
        error = response.json()["error"]
        assert error["code"] == "engine_exited"
        assert "exit status 2" in error["message"]
        assert "no-such-dtype" in error["message"]
        model = next(m for m in agent.heartbeat()["models"] if m["model_id"] == "bad")
        assert model["cache_state"] == "FAILED"
        assert [
            args
            for _, _, args in processes_mentioning(str(agent.cache_dir))
            if "api_server" in args
        ] == []


def test_vllm_serves_a_model_from_s3_then_from_its_gcs_mirror_once_s3_is_gone(
    tmp_path, engine_python, tiny, gcs
):
    # One model in two clouds. The agent (cloud=aws) reads its own cloud's S3 copy first;
    # once that copy is gone from the cache and S3 is down, the GCS mirror serves it.
    s3 = Moto(tmp_path / "moto").start()
    publish(tiny, "s3://models/org/tiny", s3.environ(), stream=io.StringIO())
    publish(tiny, "gs://models/vllm/tiny", gcs.environ(), stream=io.StringIO())
    load = {
        "model_id": "org/tiny", "source": "gs://models/vllm/tiny",
        "sources": [
            {"uri": "gs://models/vllm/tiny", "labels": {"cloud": "gcp"}},
            {"uri": "s3://models/org/tiny", "labels": {"cloud": "aws"}},
        ],
        "engine": {"args": CPU_ARGS},
    }  # fmt: skip
    agent_args = ("--engine", "vllm", "--engine-python", engine_python, "--labels", "cloud=aws")
    try:
        with running_agent(
            tmp_path, *agent_args, extra_env={**s3.environ(), **gcs.environ()}
        ) as agent:
            for expected in ("s3://models/org/tiny", "gs://models/vllm/tiny"):
                response = agent.post("/load_model", load, timeout=LOAD_TIMEOUT)
                assert response.status_code == 200, response.text
                loaded = response.json()
                assert loaded["timings"]["source"] == expected
                assert loaded["timings"]["files_cached"] is False
                client = openai.OpenAI(
                    base_url=f"{loaded['inference_endpoint_url']}/v1", api_key=agent.token
                )
                answer = client.completions.create(
                    model="org/tiny", prompt="Hello", max_tokens=4,
                    extra_body={"ignore_eos": True},
                )  # fmt: skip
                assert answer.usage is not None
                assert answer.usage.completion_tokens == 4
                # Off the GPU and off the disk; then S3 goes away.
                response = agent.post("/unload_model", {"model_id": "org/tiny", "to": "NONE"})
                assert response.status_code == 200, response.text
                s3.kill()
            assert "source s3://models/org/tiny failed" in agent.log()
    finally:
        s3.kill()
