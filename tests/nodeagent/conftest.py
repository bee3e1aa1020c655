from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import uvloop
from aiohttp import ClientSession
from aiohttp.test_utils import TestServer

from nodeagent import tinymodel
from nodeagent.config import parse_config
from nodeagent.server import AgentServer
from tests.support import free_port

TOKEN = "agent-test-token"


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """The agent's tests run on uvloop, the agent's loop (AGENT_EVENT_LOOP), whose transports
    are no subclasses of asyncio's; the relay's on asyncio's loop too."""
    if item.path.name == "test_relay.py":
        return {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tinymodel.build(tmp_path_factory.mktemp("checkpoints") / "tiny")


@dataclass
class RunningAgent:
    server: AgentServer
    url: str
    http: ClientSession
    headers: dict[str, str]

    async def post(self, path: str, body: object | None = None) -> tuple[int, dict]:
        async with self.http.post(f"{self.url}{path}", json=body, headers=self.headers) as response:
            return response.status, await response.json()

    async def heartbeat(self) -> dict:
        status, body = await self.post("/heartbeat")
        assert status == 200, body
        return body

    def model(self, heartbeat: dict, model_id: str) -> dict:
        return next(model for model in heartbeat["models"] if model["model_id"] == model_id)


def sim_args(cache_dir: Path, *extra: str) -> list[str]:
    return [
        "--token",
        TOKEN,
        "--cache-dir",
        str(cache_dir),
        "--engine",
        "sim",
        "--agent-id",
        "test-agent",
        "--sim-load-seconds",
        "0.05",
        "--sim-ttft-ms",
        "1",
        "--sim-tpot-ms",
        "1",
        "--sim-wake-seconds",
        "0.05",
        *extra,
    ]


def load_body(tiny_model, model_id: str = "org/tiny", **extra) -> dict:
    return {"model_id": model_id, "source": tiny_model.as_uri(), **extra}


def starts(agent) -> float:
    return agent.server.metrics.engine_starts.labels("sim", "ready", "plain")._value.get()


async def start_agent(args: list[str]) -> tuple[AgentServer, TestServer, str]:
    """An agent served in this event loop, advertising the address it really listens on."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = AgentServer(parse_config([*args, "--advertise-url", url], environ={}))
    test_server = TestServer(server.app(), port=port)
    await test_server.start_server()
    return server, test_server, url


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[RunningAgent]:
    server, test_server, url = await start_agent(sim_args(tmp_path / "cache"))
    async with ClientSession() as http:
        yield RunningAgent(server, url, http, {"Authorization": f"Bearer {TOKEN}"})
    await test_server.close()
