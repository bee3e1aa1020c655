"""Fixtures of the gateway's suites (tests/e2e/test_gateway.py, tests/e2e/test_gateway_limits.py):
the web process, a sim agent serving org/tiny, and an openai client of the gateway. Here
`client` is that openai client, not pytest-django's test client (no end-to-end test uses that)."""

from __future__ import annotations

import openai
import pytest

from agents.choices import AgentState, CacheLevel, PlacementState
from agents.models import Agent, Model, Placement
from nodeagent import tinymodel
from tests.e2e.agent_process import enrolment_for, running_agent
from tests.e2e.gateway_support import web_process
from tests.factories import make_api_key


@pytest.fixture
def gateway(settings, tmp_path):
    with web_process(settings, tmp_path) as (url, _):
        yield url


@pytest.fixture
def warm_model(settings, tmp_path):
    """A sim agent serving org/tiny, and the catalog rows a finished load leaves behind."""
    tiny = tinymodel.build(tmp_path / "tiny")
    args = [
        "--engine",
        "sim",
        "--sim-load-seconds",
        "0",
        "--sim-ttft-ms",
        "1",
        "--sim-tpot-ms",
        "1",
    ]
    credential, enrolled = enrolment_for("gpu-1")
    with running_agent(tmp_path, *args, token=credential) as agent:
        loaded = agent.post("/load_model", {"model_id": "org/tiny", "source": tiny.as_uri()}).json()
        model = Model.objects.create(model_id="org/tiny", source=tiny.as_uri())
        host = Agent.objects.create(
            agent_id="gpu-1", base_url=agent.url, state=AgentState.IDLE, **enrolled
        )
        Placement.objects.create(
            agent=host, model=model, state=PlacementState.READY,
            cache_level=CacheLevel.GPU_RESIDENT,
            inference_endpoint_url=loaded["inference_endpoint_url"],
        )  # fmt: skip
        yield agent


@pytest.fixture
def client(gateway):
    _, raw_key = make_api_key("e2e")
    return openai.OpenAI(base_url=f"{gateway}/v1", api_key=raw_key, max_retries=0)
