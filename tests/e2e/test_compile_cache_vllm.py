"""vLLM's compile cache with real vLLM on the CPU, compiling for real (no --enforce-eager):
kept beside the model and reused on the next start, published to the store after the
first, downloaded by a fresh agent on the same kind of device, and a corrupted one ignored
(the load succeeds all the same)."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from nodeagent import tinymodel
from nodeagent.store.publish import publish
from tests.e2e.agent_process import AgentProcess, engine_python, running_agent
from tests.e2e.test_vllm_agent import CPU_ARGS, LOAD_TIMEOUT
from tests.support import wait_for

pytestmark = pytest.mark.e2e

COMPILE_ARGS = [arg for arg in CPU_ARGS if arg != "--enforce-eager"]
PUBLISHED = 'llmfleet_agent_compile_cache_publishes_total{outcome="published"}'


def load(agent: AgentProcess, source: str) -> dict:
    body = {"model_id": "org/tiny", "source": source, "engine": {"args": COMPILE_ARGS}}
    response = agent.post("/load_model", body, timeout=LOAD_TIMEOUT)
    assert response.status_code == 200, response.text
    completion = agent.post(
        "/models/org/tiny/v1/completions",
        {"model": "org/tiny", "prompt": "Hello", "max_tokens": 4, "ignore_eos": True},
    )
    assert completion.status_code == 200, completion.text
    return response.json()["timings"]


def unload(agent: AgentProcess) -> None:
    response = agent.post("/unload_model", {"model_id": "org/tiny", "to": "NVME_CACHED"}, 60)
    assert response.status_code == 200, response.text


def compiled_files(agent: AgentProcess) -> list[Path]:
    roots = list((agent.cache_dir / "models").glob("*/.llmfleet-compile/*/torch_compile_cache"))
    return [path for root in roots for path in root.rglob("*") if path.is_file()]


def compiled_graphs_of(cache_home: Path) -> list[str]:
    """The compiled graphs' hash directories (vLLM's own key) in an agent's caches."""
    pattern = "agent-cache/models/*/.llmfleet-compile/*/torch_compile_cache/*/*"
    return sorted(path.name for path in cache_home.glob(pattern) if path.is_dir())


def compiled_graphs(agent: AgentProcess) -> list[str]:
    return compiled_graphs_of(agent.cache_dir.parent)


def test_the_compile_cache_travels_with_the_model(tmp_path):
    tiny = tinymodel.build(tmp_path / "tiny")
    store = tmp_path / "store" / "org" / "tiny"
    publish(tiny, store.as_uri(), {}, stream=io.StringIO())
    agent_args = ("--engine", "vllm", "--engine-python", engine_python())

    # vLLM's compile hash includes the model's path: hosts share caches when their cache
    # directories have the same path (one AGENT_CACHE_DIR fleet-wide). The second agent is a
    # fresh host at the same path: the first one's directory is moved away.
    host = tmp_path / "host"
    host.mkdir()
    with running_agent(host, *agent_args) as first:
        assert load(first, store.as_uri())["compile_cache"] == "new"
        assert compiled_files(first)
        wait_for(lambda: first.metric(PUBLISHED) == 1, 60, "the compile cache's publish")
        [published] = (tmp_path / "store" / "org").glob("tiny.llmfleet-compile/*")
        assert (published / "llmfleet-manifest.json").exists()
        # A second start on the same host: the cache kept beside the model.
        unload(first)
        assert load(first, store.as_uri())["compile_cache"] == "local"
        assert first.metric(PUBLISHED) == 1  # its own cache: nothing more to publish

    host.rename(tmp_path / "first-host")
    host.mkdir()
    with running_agent(host, *agent_args) as second:
        timings = load(second, store.as_uri())
        assert timings["compile_cache"] == "store"
        # It compiled nothing: vLLM found its graphs in what was downloaded.
        assert compiled_graphs(second) == compiled_graphs_of(tmp_path / "first-host")
        # A corrupted cache never fails a load: vLLM compiles anew, or the agent deletes it
        # and starts once more without it.
        unload(second)
        for path in compiled_files(second):
            path.write_bytes(b"\0garbage\0" * 16)
        timings = load(second, store.as_uri())
        assert timings["compile_cache"] in ("local", "discarded"), timings
