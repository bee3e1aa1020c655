"""One request, one trace, with real processes: the web process, the workers, a node agent
with its sim engine, the official openai client, and an OTLP/HTTP receiver (tests/otlp.py)
standing in for the collector."""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack

import openai
import pytest

from agents import actions
from agents.models import Agent, LoadEvent
from nodeagent import tinymodel
from tests.e2e.agent_process import ROOT
from tests.e2e.fleet import running_control_plane
from tests.factories import make_api_key
from tests.otlp import otlp_receiver
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

APP_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
APP_SPAN = "00f067aa0ba902b7"
SECRET = "the prompt says 7391 and no span may"
SERVER, CLIENT = 2, 3  # OTLP span kinds


def test_a_cold_then_a_warm_stream_each_give_one_trace_linked_to_the_cold_start(settings, tmp_path):
    log = tmp_path / "engine.jsonl"
    with otlp_receiver() as receiver, ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(
            settings, tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=receiver.url
        ))  # fmt: skip
        plane.agent(stack, tmp_path, "gpu-a", "--engine", "sim", "--sim-load-seconds", "0.2",
                    "--sim-request-log", str(log), "--otlp-endpoint", receiver.url)  # fmt: skip
        wait_for(lambda: Agent.objects.filter(agent_id="gpu-a").exists(), 30, "registration")
        tiny = tinymodel.build(tmp_path / "tiny")
        actions.register_catalog_model("org/tiny", tiny.as_uri(), size_bytes=1)
        _, key = make_api_key("traced")
        client = openai.OpenAI(base_url=f"{plane.url}/v1", api_key=key, max_retries=0)
        asked = {"model": "org/tiny", "messages": [{"role": "user", "content": SECRET}],
                 "max_tokens": 3, "stream": True}  # fmt: skip
        cold = client.chat.completions.create(
            **asked, extra_headers={"traceparent": f"00-{APP_TRACE}-{APP_SPAN}-01"}
        )
        assert "".join(c.choices[0].delta.content or "" for c in cold if c.choices)
        warm = client.chat.completions.create(**asked)
        assert "".join(c.choices[0].delta.content or "" for c in warm if c.choices)
        event = LoadEvent.objects.get(model__model_id="org/tiny", kind="LOAD")
        gateway = receiver.wait_for(2, name="POST /v1/chat/completions")
        agent = receiver.wait_for(2, name="agent proxy")
        engine = receiver.wait_for(2, name="engine POST /v1/chat/completions")
        phases = {span.name: span for span in receiver.wait_for(6, trace_id=event.trace_id)}
        bodies = list(receiver.bodies)

    first, second = sorted(gateway, key=lambda span: span.start_ns)
    # The cold request continues the application's trace; the warm one starts its own.
    assert (first.trace_id, first.parent_id) == (APP_TRACE, APP_SPAN)
    assert second.trace_id != APP_TRACE
    assert second.parent_id == ""
    for request in (first, second):
        assert request.service == "llmfleet-gateway"
        assert request.kind == SERVER
        assert request.attributes["llmfleet.model"] == "org/tiny"
        assert request.attributes["llmfleet.key"] == "traced"
        assert request.attributes["llmfleet.agent"] == "gpu-a"
        assert request.attributes["llmfleet.stream"] is True
        assert request.attributes["http.response.status_code"] == 200
        assert request.attributes["llmfleet.completion_tokens"] == 3
        [proxy] = [s for s in agent if s.parent_id == request.span_id]
        assert proxy.trace_id == request.trace_id
        assert proxy.service == "llmfleet-agent"
        [exchange] = [s for s in engine if s.parent_id == proxy.span_id]
        assert exchange.kind == CLIENT
    assert first.attributes["llmfleet.start"] == "cold"
    assert second.attributes["llmfleet.start"] == "warm"
    # The cold request links to the cold start's trace, whose phases are there.
    assert (event.trace_id, event.span_id) in first.links
    root = phases[f"cold start {'org/tiny'}"]
    assert root.span_id == event.span_id
    assert root.parent_id == ""
    assert root.attributes["llmfleet.agent"] == "gpu-a"
    assert root.attributes["llmfleet.outcome"] == "SUCCEEDED"
    assert {"queued", "download", "engine start", "first token"} <= set(phases)
    assert phases["download"].attributes["llmfleet.source"] == tiny.as_uri()
    assert phases["download"].attributes["llmfleet.failovers"] == 0
    assert all(phases[n].parent_id == event.span_id for n in ("queued", "engine start"))
    # The load task carried the context of the request that asked for it: its span is in the
    # cold start's trace, linked to that request.
    task = phases["task agents.tasks.load"]
    assert task.parent_id == event.span_id
    assert (first.trace_id, first.span_id) in task.links
    # The engine was asked with the agent's engine span as the parent.
    took = [json.loads(line) for line in log.read_text().splitlines()]
    assert {entry["traceparent"].split("-")[2] for entry in took} == {
        span.span_id for span in engine
    }
    # No prompt, no body, in anything exported.
    assert not any(b"7391" in body for body in bodies)


def test_tracing_off_imports_no_opentelemetry_on_the_request_path(settings):
    # The web process's modules for a /v1 request, and the tracer they ask for: None. (redis
    # 8 imports OpenTelemetry's metrics API for its own, optional, observability: not ours.)
    code = (
        "import django, os, sys; os.environ['DJANGO_SETTINGS_MODULE']='controlplane.settings'; "
        "django.setup(); "
        "import controlplane.asgi, controlplane.gateway.views, controlplane.gateway.warm, "
        "controlplane.gateway.cold, agents.actions, agents.traces; "
        "from controlplane import traces; assert traces.tracer() is None; "
        "assert traces.tracer(traces.LIFECYCLE) is None; "
        "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', "
        "'opentelemetry.exporter', 'opentelemetry.trace.propagation.tracecontext'))))"
    )
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT, env=env)  # fmt: skip
    assert out.stdout.strip() == "[]"
