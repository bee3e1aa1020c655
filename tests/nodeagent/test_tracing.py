"""nodeagent.tracing against a real OTLP/HTTP receiver: parents, links, sampling, and nothing
imported while tracing is off."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from nodeagent import tracing
from tests.otlp import otlp_receiver

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
UNSAMPLED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"


def test_the_endpoint_follows_opentelemetrys_variables():
    assert tracing.traces_endpoint({}) == ""
    base = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}
    assert tracing.traces_endpoint(base) == "http://collector:4318/v1/traces"
    both = {**base, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:4318/x"}
    assert tracing.traces_endpoint(both) == "http://t:4318/x"
    assert tracing.from_environment("gateway", environ={}) is None


def test_a_span_continues_the_callers_trace_and_the_next_hop_continues_it():
    with otlp_receiver() as receiver:
        tracer = tracing.from_environment(
            "gateway", environ={"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        )
        assert tracer is not None
        span = tracer.start("POST /v1/chat/completions", parent={"traceparent": PARENT},
                            attributes={"llmfleet.model": "org/tiny"},
                            links=[("1" * 32, "2" * 16)])  # fmt: skip
        headers: dict[str, str] = {}
        tracer.inject(span, headers)
        child = tracer.child("route", span)
        child.end()
        tracing.failed(span, "replica gone")
        span.end()
        tracer.shutdown()
        [received] = receiver.wait_for(1, name="POST /v1/chat/completions")
        [route] = receiver.wait_for(1, name="route")
    trace_id, span_id = tracing.ids(span)
    assert (received.trace_id, received.span_id) == (trace_id, span_id)
    assert received.trace_id == "0af7651916cd43dd8448eb211c80319c"
    assert received.parent_id == "b7ad6b7169203331"
    assert received.service == "gateway"
    assert received.attributes == {"llmfleet.model": "org/tiny"}
    assert received.links == (("1" * 32, "2" * 16),)
    assert received.status == 2  # ERROR
    assert route.parent_id == span_id
    assert headers["traceparent"] == f"00-{trace_id}-{span_id}-01"


def test_sampling_is_the_parents_and_the_ratio_for_new_traces():
    with otlp_receiver() as receiver:
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        tracer = tracing.from_environment("agent", sample_ratio=0.0, environ=environ)
        assert tracer is not None
        tracer.start("sampled parent", parent={"traceparent": PARENT}).end()
        tracer.start("unsampled parent", parent={"traceparent": UNSAMPLED}).end()
        tracer.start("new trace at ratio 0").end()
        tracer.shutdown()
        assert [span.name for span in receiver.wait_for(1)] == ["sampled parent"]


def test_off_imports_nothing_of_opentelemetry():
    code = (
        "import sys; from nodeagent import tracing; "
        "assert tracing.from_environment('gateway', environ={}) is None; "
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


async def test_the_agents_span_continues_the_gateways_and_the_engine_continues_the_agents(
    tmp_path, tiny_model
):
    from aiohttp import ClientSession

    from tests.nodeagent.conftest import TOKEN, sim_args, start_agent

    log = tmp_path / "engine.jsonl"
    with otlp_receiver() as receiver:
        _, test_server, url = await start_agent(sim_args(
            tmp_path / "cache", "--sim-request-log", str(log), "--otlp-endpoint", receiver.url
        ))  # fmt: skip
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with ClientSession() as http:
            load = {"model_id": "org/tiny", "source": tiny_model.as_uri()}
            async with http.post(f"{url}/load_model", json=load, headers=headers) as answer:
                assert answer.status == 200, await answer.text()
            body = {"model": "org/tiny", "messages": [{"role": "user", "content": "hi"}],
                    "max_tokens": 3, "stream": True}  # fmt: skip
            async with http.post(
                f"{url}/models/org/tiny/v1/chat/completions", json=body,
                headers={**headers, "traceparent": PARENT},
            ) as answer:  # fmt: skip
                assert answer.status == 200
                await answer.read()
            missing = {"model": "org/none", "messages": [], "max_tokens": 1}
            async with http.post(
                f"{url}/models/org/none/v1/chat/completions", json=missing,
                headers={**headers, "traceparent": PARENT},
            ) as answer:  # fmt: skip
                assert answer.status == 404
        await test_server.close()  # the agent's shutdown exports what is buffered
        proxies = receiver.wait_for(2, name="agent proxy")
        [engine] = receiver.wait_for(1, name="engine POST /v1/chat/completions")
    ok, refused = sorted(proxies, key=lambda span: span.attributes["http.response.status_code"])
    assert {ok.trace_id, refused.trace_id, engine.trace_id} == {"0af7651916cd43dd8448eb211c80319c"}
    assert ok.parent_id == refused.parent_id == "b7ad6b7169203331"
    assert ok.service == "llmfleet-agent"
    assert ok.attributes["llmfleet.agent_id"] == "test-agent"
    assert ok.attributes["http.response.status_code"] == 200
    assert (refused.attributes["http.response.status_code"], refused.status) == (404, 2)
    assert engine.parent_id == ok.span_id
    assert engine.kind == 3  # CLIENT
    took = [json.loads(line) for line in log.read_text().splitlines()]
    assert [entry["traceparent"] for entry in took] == [f"00-{engine.trace_id}-{engine.span_id}-01"]
    assert "hi" not in str([span.attributes for span in receiver.spans])  # no prompt in a span


def test_a_pending_span_is_decided_at_once_and_recorded_whole_as_it_ends():
    with otlp_receiver() as receiver:
        environ = {"OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url}
        tracer = tracing.from_environment("gateway", environ=environ)
        assert tracer is not None
        pending = tracer.begin({"traceparent": PARENT})
        assert pending.sampled
        assert pending.traceparent.startswith("00-0af7651916cd43dd8448eb211c80319c-")
        assert pending.traceparent.endswith("-01")
        pending.attributes["llmfleet.model"] = "org/tiny"
        pending.event("routed", {"llmfleet.agent": "gpu-a"})
        pending.links.append(("1" * 32, "2" * 16))
        child = tracer.child_of(pending)
        tracer.record(child, "engine POST /v1/x", "client", time.time_ns())
        tracer.record(pending, "POST /v1/x", "server", time.time_ns() - 1000, error="status 502")
        pending.attributes["llmfleet.late"] = 1  # noted after it was handed over: not exported
        unsampled = tracer.begin({"traceparent": UNSAMPLED})
        assert unsampled.traceparent.endswith("-00")  # the caller's decision goes on
        tracer.record(unsampled, "not recorded", "server", time.time_ns())
        tracer.shutdown()
        [span] = receiver.wait_for(1, name="POST /v1/x")
        [engine] = receiver.wait_for(1, name="engine POST /v1/x")
        assert not receiver.wait_for(1, timeout=0, name="not recorded")
    trace_id, span_id = pending.ids
    assert (span.trace_id, span.span_id, span.parent_id) == (trace_id, span_id, "b7ad6b7169203331")
    assert span.attributes == {"llmfleet.model": "org/tiny"}
    assert (span.links, span.status, span.kind) == ((("1" * 32, "2" * 16),), 2, 2)
    assert (engine.trace_id, engine.parent_id, engine.kind) == (trace_id, span_id, 3)


@pytest.mark.parametrize(
    "header",
    [
        "",
        "garbage",
        "00-xyz-b7ad6b7169203331-01",
        "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        "00-00000000000000000000000000000000-b7ad6b7169203331-01",
    ],
)
def test_a_traceparent_that_is_not_one_starts_a_trace_of_its_own(header):
    tracer = tracing.Tracer("gateway", "http://127.0.0.1:9/v1/traces", sample_ratio=1.0)
    pending = tracer.begin({"traceparent": header})
    assert pending.parent_id is None
    assert pending.sampled  # a new trace, at the ratio (1.0)
    assert tracing.Tracer("g", "http://127.0.0.1:9/v1/traces", 0.0).begin({}).sampled is False
