"""Many simulated agents in one process, as fleet-scale tests and benchmarks need."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from nodeagent.simfleet import fleet_configs
from tests.support import free_port_block, wait_for

ROOT = Path(__file__).resolve().parents[2]


def test_each_agent_gets_its_own_id_port_and_cache(tmp_path):
    configs = fleet_configs(
        [
            "--count",
            "3",
            "--base-port",
            "9500",
            "--cache-root",
            str(tmp_path),
            "--token",
            "t",
            "--sim-ttft-ms",
            "7",
        ]
    )
    assert [(c.agent_id, c.port, c.engine) for c in configs] == [
        ("sim-0", 9500, "sim"), ("sim-1", 9501, "sim"), ("sim-2", 9502, "sim"),
    ]  # fmt: skip
    assert len({c.cache_dir for c in configs}) == 3
    assert {c.sim.ttft_ms for c in configs} == {7.0}
    assert not any(c.kv_events for c in configs)  # a ZMQ context's 1,023 sockets: off here
    (shown,) = fleet_configs(["--count", "1", "--cache-root", str(tmp_path), "--token", "t",
                              "--kv-events", "true"])  # fmt: skip
    assert shown.kv_events


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return (
        int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS")))
        / 1024
    )


@pytest.mark.e2e
def test_a_hundred_sim_agents_share_one_small_process(tmp_path, tiny_model):
    count = 100
    base = free_port_block(count)
    fleet = subprocess.Popen(
        [sys.executable, "-m", "nodeagent.simfleet", "--count", str(count),
         "--base-port", str(base), "--cache-root", str(tmp_path), "--token", "t",
         "--sim-load-seconds", "0"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    headers = {"Authorization": "Bearer t"}
    try:

        def all_up() -> bool:
            if fleet.poll() is not None:
                raise AssertionError(f"simfleet exited: {fleet.stderr.read().decode()[-2000:]}")
            try:
                return requests.get(f"http://127.0.0.1:{base + count - 1}/healthz", timeout=1).ok
            except requests.ConnectionError:
                return False

        wait_for(all_up, 60, "the last agent")
        for number in (0, count // 2, count - 1):
            url = f"http://127.0.0.1:{base + number}"
            load = {"model_id": "m", "source": tiny_model.as_uri()}
            assert requests.post(f"{url}/load_model", json=load, headers=headers, timeout=30).ok
            heartbeat = requests.post(f"{url}/heartbeat", headers=headers, timeout=5).json()
            assert heartbeat["agent_id"] == f"sim-{number}"
            assert heartbeat["models"][0]["cache_state"] == "READY"
        # Far below 100 separate agent processes (about 44 MB each).
        assert rss_mib(fleet.pid) < 400
    finally:
        fleet.send_signal(signal.SIGTERM)
        fleet.wait(timeout=60)
    assert fleet.returncode == 0, fleet.stderr.read().decode() if fleet.stderr else ""
