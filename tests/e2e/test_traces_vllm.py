"""Traces with the real vLLM engine on the CPU: its own spans arrive under the agent's."""

from __future__ import annotations

from pathlib import Path

import pytest
import requests

from nodeagent import tinymodel
from tests.e2e.agent_process import engine_python as find_engine_python
from tests.e2e.agent_process import running_agent
from tests.e2e.test_vllm_agent import CPU_ARGS, LOAD_TIMEOUT
from tests.otlp import otlp_receiver

pytestmark = pytest.mark.e2e

GATEWAY_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
GATEWAY_SPAN = "00f067aa0ba902b7"


def test_the_engines_spans_land_under_the_agents(tmp_path: Path) -> None:
    tiny = tinymodel.build(tmp_path / "tiny")
    with otlp_receiver() as receiver:
        args = ("--engine", "vllm", "--engine-python", find_engine_python(),
                "--standby-engines", "0", "--otlp-endpoint", receiver.url)  # fmt: skip
        with running_agent(tmp_path, *args) as agent:
            load = {"model_id": "org/tiny", "source": tiny.as_uri(), "engine": {"args": CPU_ARGS}}
            loaded = agent.post("/load_model", load, timeout=LOAD_TIMEOUT)
            assert loaded.status_code == 200, loaded.text
            answer = requests.post(
                f"{loaded.json()['inference_endpoint_url']}/v1/completions",
                json={"model": "org/tiny", "prompt": "hello", "max_tokens": 4},
                headers={"Authorization": f"Bearer {agent.token}",
                         "traceparent": f"00-{GATEWAY_TRACE}-{GATEWAY_SPAN}-01"},
                timeout=60,
            )  # fmt: skip
            assert answer.status_code == 200, answer.text
            [proxy] = receiver.wait_for(1, name="agent proxy")
            [exchange] = receiver.wait_for(1, name="engine POST /v1/completions")
            # vLLM exports its request span as the request ends, in a batch of its own.
            engine = receiver.wait_for(1, timeout=60, parent_id=exchange.span_id)
    assert proxy.parent_id == GATEWAY_SPAN
    assert exchange.parent_id == proxy.span_id
    assert engine, "vLLM exported no span under the agent's"
    assert {span.trace_id for span in engine} == {GATEWAY_TRACE}
    assert {span.service for span in engine} == {"vllm"}
