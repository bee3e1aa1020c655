"""A real node agent process loading models published to a real Azurite."""

from __future__ import annotations

import contextlib
import signal
import threading

import pytest
import requests

from tests.e2e.agent_process import running_agent
from tests.store.conftest import quiet_publish
from tests.support import wait_for

pytestmark = pytest.mark.e2e


def test_an_agent_loads_a_model_published_to_azurite(azurite, checkpoint, tmp_path):
    quiet_publish(checkpoint, "azure://models/e2e/synthetic", azurite.environ())
    with running_agent(tmp_path, "--engine", "sim", extra_env=azurite.environ()) as agent:
        response = agent.post(
            "/load_model", {"model_id": "e2e/synthetic", "source": "azure://models/e2e/synthetic"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["timings"]["download_seconds"] > 0
        model = agent.heartbeat()["models"][0]
        assert (model["cache_state"], model["bytes_done"], model["progress"]) == (
            "READY",
            model["bytes_total"],
            1.0,
        )
        assert agent.metric('llmfleet_agent_downloads_total{outcome="complete"}') == 1


def test_an_agent_killed_mid_download_resumes_after_a_restart(azurite, checkpoint, tmp_path):
    uri = "azure://models/e2e/resume"
    quiet_publish(checkpoint, uri, azurite.environ())
    total = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    slow = [
        "--engine",
        "sim",
        "--download-limit-mb-s",
        "8",
        "--download-range-mib",
        "1",
        "--download-concurrency",
        "2",
    ]
    load = {"model_id": "e2e/resume", "source": uri}

    with running_agent(tmp_path, *slow, extra_env=azurite.environ()) as agent:

        def load_until_killed() -> None:
            # This request dies with the agent: its connection drops when the process is killed.
            with contextlib.suppress(requests.ConnectionError):
                agent.post("/load_model", load, timeout=60)

        threading.Thread(target=load_until_killed, daemon=True).start()

        def a_third_done() -> bool:
            models = agent.heartbeat()["models"]
            return bool(models) and models[0]["bytes_done"] > total / 3

        wait_for(a_third_done, 30, "a third of the download")
        model = agent.heartbeat()["models"][0]
        assert model["cache_state"] == "DOWNLOADING"
        assert model["download_bytes_per_s"] > 1e6  # the heartbeat shows the current throughput
        assert agent.heartbeat()["state"] == "LOADING_MODEL"
        agent.process.send_signal(signal.SIGKILL)
        agent.process.wait()

    # Same cache directory, a new process: only the missing bytes are fetched.
    with running_agent(tmp_path, "--engine", "sim", extra_env=azurite.environ()) as agent:
        response = agent.post("/load_model", load, timeout=60)
        assert response.status_code == 200, response.text
        assert agent.metric('llmfleet_agent_downloads_total{outcome="resumed"}') == 1
        fetched = agent.metric("llmfleet_agent_download_bytes_total")
        assert 0 < fetched < total * 0.7
