"""The gateway for real, what it counts and refuses: usage as the engine reported it and as a
stopping web process (uvicorn, and daphne where both are supported) writes it, a key's rate
limit, a body over the size limit, and a user kept on one replica. The shared fixtures are in
tests/e2e/conftest.py."""

from __future__ import annotations

import signal

import openai
import pytest
import requests

from agents.choices import PlacementState
from agents.models import Agent, Model, Placement
from controlplane.gateway.models import Usage
from nodeagent import tinymodel
from tests.e2e.agent_process import enrolment_for, running_agent
from tests.e2e.gateway_support import raw_request, usage_of, web_process
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_usage_is_recorded_as_the_engine_reported_it(client, warm_model):
    messages = [{"role": "user", "content": "count these words"}]
    client.chat.completions.create(model="org/tiny", messages=messages, max_tokens=5)
    stream = client.chat.completions.create(
        model="org/tiny", messages=messages, max_tokens=7, stream=True
    )
    chunks = list(stream)
    # The gateway asked the engine for usage itself: the client, which did not, never sees it.
    assert all(chunk.choices for chunk in chunks)
    assert all(chunk.usage is None for chunk in chunks)

    usage = usage_of(requests=2)
    assert (usage.prompt_tokens, usage.completion_tokens) == (3 + 3, 5 + 7)


def test_a_stream_open_when_the_web_process_stops_finishes(settings, tmp_path, warm_model):
    """SIGTERM drains (WEB_DRAIN_SECONDS): no new connections, and a stream under way runs to
    its end, charged in full by the stop's last writes."""
    with web_process(settings, tmp_path, GATEWAY_USAGE_FLUSH_SECONDS="600") as (url, web):
        _, raw_key = make_api_key("draining")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0)
        stream = client.chat.completions.create(
            model="org/tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=1000,
            stream=True, stream_options={"include_usage": True},
        )  # fmt: skip
        chunks = [next(stream)]  # under way: 1,000 tokens at 1 ms each
        web.send_signal(signal.SIGTERM)

        def refused() -> bool:
            try:
                requests.get(f"{url}/healthz", timeout=2)
            except requests.ConnectionError:
                return True
            return False

        wait_for(refused, 10, "the web process to stop listening")
        chunks += list(stream)
        assert web.wait(timeout=30) in (0, -signal.SIGTERM)
    assert chunks[-1].usage.completion_tokens == 1000
    assert chunks[-2].choices[0].finish_reason == "length"
    usage = Usage.objects.get()
    assert (usage.requests, usage.completion_tokens) == (1, 1000)


@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_a_stopped_web_process_writes_its_usage_and_closes_its_connections(
    settings, tmp_path, warm_model, server
):
    # Usage is written every 10 minutes here: only the stop itself can write it.
    with web_process(settings, tmp_path, server, GATEWAY_USAGE_FLUSH_SECONDS="600") as (url, web):
        _, raw_key = make_api_key("stopping")
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0)
        client.responses.create(model="org/tiny", input="hello there", max_output_tokens=3)
        list(client.chat.completions.create(model="org/tiny", messages=[{"role": "user",
             "content": "hi"}], max_tokens=2, stream=True))  # fmt: skip
        assert not Usage.objects.exists()
        web.send_signal(signal.SIGINT)  # what Ctrl-C on `make run` sends
        # A clean stop: daphne exits 0, uvicorn by the signal it stopped on, once it is done.
        assert web.wait(timeout=30) in (0, -signal.SIGINT)
    usage = Usage.objects.get()
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (2, 2 + 1, 3 + 2)
    log = (tmp_path / "web.log").read_text()
    assert "Unclosed" not in log
    assert " ERROR " not in log


def test_a_key_over_its_limit_gets_429_with_retry_after(gateway, warm_model):
    _, raw_key = make_api_key("limited", requests_per_minute=2)
    limited = openai.OpenAI(base_url=f"{gateway}/v1", api_key=raw_key, max_retries=0)
    for _ in range(2):
        limited.chat.completions.create(
            model="org/tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    with pytest.raises(openai.RateLimitError) as raised:
        limited.chat.completions.create(
            model="org/tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1
        )
    assert 1 <= int(raised.value.response.headers["Retry-After"]) <= 60


def test_a_user_stays_on_one_replica_and_moves_when_it_drains(
    client, warm_model, settings, tmp_path
):
    from agents.actions import drain_agent

    tiny = tinymodel.build(tmp_path / "tiny2")
    (tmp_path / "second").mkdir()
    args = ["--engine", "sim", "--sim-load-seconds", "0"]
    credential, enrolled = enrolment_for("gpu-2")
    with running_agent(tmp_path / "second", *args, token=credential) as second:
        loaded = second.post(
            "/load_model", {"model_id": "org/tiny", "source": tiny.as_uri()}
        ).json()
        other = Agent.objects.create(agent_id="gpu-2", base_url=second.url, **enrolled)
        Placement.objects.create(
            agent=other, model=Model.objects.get(), state=PlacementState.READY,
            inference_endpoint_url=loaded["inference_endpoint_url"],
        )  # fmt: skip

        def served_by() -> dict[str, float]:
            return {
                agent.url: agent.metric("llmfleet_agent_proxy_requests_total")
                for agent in (warm_model, second)
            }

        def ask() -> None:
            client.chat.completions.create(
                model="org/tiny",
                messages=[{"role": "user", "content": "x"}],
                max_tokens=1,
                user="alice",
            )

        before = served_by()
        for _ in range(5):
            ask()
        after = served_by()
        home = next(
            url for url in after if after[url] - before[url] == 5
        )  # all five on one replica
        drain_agent(Agent.objects.get(base_url=home).agent_id)
        ask()
        moved = served_by()
        assert moved[home] == after[home]
        assert sum(moved.values()) == sum(after.values()) + 1


@pytest.mark.parametrize("server", ["uvicorn", "daphne"])
def test_a_body_over_the_limit_is_refused_before_it_is_stored(settings, tmp_path, server):
    """An oversized body is answered 413 as its headers arrive, without a byte of it being sent
    or stored; a chunked one once its chunks pass the limit. daphne (Twisted) would buffer a
    whole body before the application sees it; uvicorn passes it on, and Django would spool it
    to disk."""
    with web_process(settings, tmp_path, server) as (url, _):
        refuses_bodies_over_the_limit(url, settings)


def refuses_bodies_over_the_limit(gateway: str, settings) -> None:
    _, raw_key = make_api_key("big")
    size = 10 * 1024**3  # 10 GiB declared, none sent
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
        f"Authorization: Bearer {raw_key}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {size}\r\n\r\n"
    ).encode()
    answer = raw_request(gateway, head)
    assert answer.startswith(b"HTTP/1.1 413")
    assert b'"code": "request_too_large"' in answer
    # Chunked, with no length declared: refused once the chunks pass the limit.
    chunked = head.replace(f"Content-Length: {size}".encode(), b"Transfer-Encoding: chunked")
    chunk = b"x" * (1024 * 1024)
    body = b"".join(b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(8)) + b"0\r\n\r\n"
    assert len(chunk) * 8 > settings.GATEWAY_MAX_BODY_BYTES
    assert raw_request(gateway, chunked, body).startswith(b"HTTP/1.1 413")
    # Under the limit and well-formed, the same path answers as ever.
    response = requests.post(
        f"{gateway}/v1/chat/completions", data=b"{not json", timeout=10,
        headers={"Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 400
