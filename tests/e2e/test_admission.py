"""Admission for real: daphne, both Celery workers, beat, PostgreSQL, Redis, a sim node agent
whose engine runs 4 sequences at a time at 20 ms a token, and the official openai client.

One key floods; another key's requests still start at once (the reserved seat) and finish
while the flood waits in the gateway; a held stream gets its head at once, then tokens; past a key's
bound the answer is 429 queue_full with Retry-After; past its deadline 503 queue_timeout, and
the engine never sees that request; a key may not ask for a class it was not given."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack

import openai
import pytest
import requests

from agents import actions
from agents.models import Agent, Model, Placement
from controlplane.gateway.models import PriorityClasses, RequestMinute
from nodeagent import tinymodel
from tests.e2e.agent_process import AgentProcess
from tests.e2e.fleet import SCRAPER, registered, running_control_plane, serving_on
from tests.e2e.injectors import private_redis
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

SIM = ["--engine", "sim", "--sim-load-seconds", "0.2", "--sim-ttft-ms", "20",
       "--sim-tpot-ms", "20", "--sim-max-num-seqs", "4"]  # fmt: skip
FLOOD = 12  # key A's streams at once: 3 run (the 4th seat is kept), 9 wait in the gateway
LONG = 100  # tokens of each of A's answers: 2 s each
PER_KEY_BOUND = 11  # A's requests held at most: its flood's 9, its held stream, one more


def relayed(agent: AgentProcess) -> float:
    """Requests the agent relayed to its engine (its own /metrics)."""
    text = requests.get(f"{agent.url}/metrics", headers=agent.headers, timeout=5).text
    found = re.findall(r"^llmfleet_agent_proxy_requests_total\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(value) for value in found)


def client(raw_key: str, url: str, **headers: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=raw_key, max_retries=0, timeout=60,
                         default_headers=headers)  # fmt: skip


def long_stream(api: openai.OpenAI, finished: list[float]) -> None:
    stream = api.chat.completions.create(
        model="org/tiny", messages=[{"role": "user", "content": "flood"}], max_tokens=LONG,
        stream=True,
    )  # fmt: skip
    for _ in stream:
        pass
    finished.append(time.monotonic())


def test_a_flood_from_one_key_waits_in_the_gateway_and_starves_no_other(settings, tmp_path):
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(
            settings, tmp_path, GATEWAY_QUEUE_MAX_PER_KEY=str(PER_KEY_BOUND),
        ))  # fmt: skip
        agent = plane.agent(stack, tmp_path, "a1", *SIM)
        registered("a1")
        tiny = tinymodel.build(tmp_path / "tiny").as_uri()
        model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1)
        serving_on(model, "a1")
        wait_for(lambda: Placement.objects.get(model=model).max_num_seqs == 4, 10,
                 "the agent's max_num_seqs on its replica")  # fmt: skip
        _, key_a = make_api_key("flood", all_models=True)
        _, key_b = make_api_key("steady", all_models=True)
        _, key_c = make_api_key("interactive-only", all_models=True,
                                priority_classes=PriorityClasses.INTERACTIVE)  # fmt: skip
        flooder, steady = client(key_a, plane.url), client(key_b, plane.url)
        pool = stack.enter_context(ThreadPoolExecutor(FLOOD + 4))
        finished: list[float] = []
        flood = [pool.submit(long_stream, flooder, finished) for _ in range(FLOOD)]
        wait_for(lambda: queued(plane.url, "flood") == FLOOD - 3, 20, "the flood held")
        # A held stream answers at once, then streams its answer once it has a seat.
        held = pool.submit(raw_stream, plane.url, key_a)
        wait_for(lambda: queued(plane.url, "flood") == FLOOD - 2, 20, "the stream held")

        # B's requests start on the kept seat and finish while every one of A's still runs
        # or waits (A's first answers take 2 s).
        for number in range(3):
            answer = steady.chat.completions.create(
                model="org/tiny", messages=[{"role": "user", "content": f"b {number}"}],
                max_tokens=5,
            )  # fmt: skip
            assert answer.choices[0].message.content
        assert finished == [], "B waited behind A's flood"

        # Clients that leave while held: a plain request that times out, a stream closed once
        # its head came. Their places go back (nothing leaks: see the counts at the end).
        with pytest.raises(requests.Timeout):
            requests.post(f"{plane.url}/v1/chat/completions", timeout=0.5,
                          json={"model": "org/tiny", "max_tokens": 1,
                                "messages": [{"role": "user", "content": "gone"}]},
                          headers={"Authorization": f"Bearer {key_a}"})  # fmt: skip
        wait_for(lambda: queued(plane.url, "flood") == FLOOD - 2, 10, "the first one gone")
        with requests.post(f"{plane.url}/v1/chat/completions", stream=True, timeout=10,
                           json={"model": "org/tiny", "max_tokens": 1, "stream": True,
                                 "messages": [{"role": "user", "content": "gone too"}]},
                           headers={"Authorization": f"Bearer {key_a}"}) as left:  # fmt: skip
            assert left.status_code == 200
            assert left.headers["Content-Type"].startswith("text/event-stream")
        wait_for(lambda: queued(plane.url, "flood") == FLOOD - 2, 10, "the second one gone")
        # Past its deadline: 503 queue_timeout, and the engine never sees it.
        hurried = client(key_a, plane.url, **{"X-Queue-Timeout": "0.3"})
        with pytest.raises(openai.InternalServerError) as late:
            ask(hurried)
        assert (late.value.status_code, late.value.code) == (503, "queue_timeout")
        # At A's bound (10 held, one more may wait): 429 queue_full, with when to come back.
        more = [pool.submit(ask, flooder) for _ in range(2)]
        refusals = [error for error in (a.exception(timeout=60) for a in more) if error]
        assert len(refusals) == 1, refusals
        (full,) = refusals
        assert isinstance(full, openai.RateLimitError)
        assert full.code == "queue_full"
        assert int(full.response.headers["Retry-After"]) >= 1
        # A class the key was not given: 400, before anything waits.
        with pytest.raises(openai.BadRequestError) as refused:
            client(key_c, plane.url).chat.completions.create(
                model="org/tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1,
                extra_body={"priority_class": "batch"},
            )  # fmt: skip
        assert refused.value.code == "priority_class_not_allowed"

        for done in flood:
            done.result(timeout=60)
        lines = held.result(timeout=60)
        # Keep-alive comments, if it waited past 10 s, and only before its first event.
        first = next(n for n, line in enumerate(lines) if line.startswith("data: {"))
        assert set(lines[:first]) <= {": queued for org/tiny"}
        assert not any(line.startswith(":") for line in lines[first:])
        assert lines[-1] == "data: [DONE]"
        assert queued(plane.url, "flood") == 0
        # Every admitted request reached the engine once (A's flood, its held stream and the
        # one more that waited, B's three); the late, the refused and the gone never did.
        assert relayed(agent) == FLOOD + 1 + 1 + 3
        assert in_flight(plane.url) == 0  # every seat given back
        text = requests.get(f"{plane.url}/metrics", headers=SCRAPER, timeout=5).text
        assert re.search(r'llmfleet_gateway_shed_total\{model="org/tiny",reason="key_queue_full"'
                         r"\} 1\.0", text)  # fmt: skip
        assert re.search(r'llmfleet_gateway_shed_total\{model="org/tiny",reason="queue_timeout"'
                         r"\} 1\.0", text)  # fmt: skip
        # The dashboard's per-model minutes count the held requests (the flood's 9, the held
        # stream, the two that left, the one more, the late one) and the shed (the late one,
        # the refused one).
        wait_for(lambda: minutes(model) == (FLOOD - 3 + 5, 2), 10, "the request minutes")
        waited = r'_queue_wait_seconds_count\{key="flood",model="org/tiny",priority_class='
        assert re.search(waited + r'"interactive"\} [1-9]', text)


def minutes(model: Model) -> tuple[int, int]:
    """Requests that waited for a seat, and requests shed, as the dashboard's minutes say."""
    rows = RequestMinute.objects.filter(model=model)
    return sum(row.queued for row in rows), sum(row.shed for row in rows)


def ask(api: openai.OpenAI) -> None:
    api.chat.completions.create(
        model="org/tiny", messages=[{"role": "user", "content": "more"}], max_tokens=1
    )


def in_flight(url: str) -> float:
    text = requests.get(f"{url}/metrics", headers=SCRAPER, timeout=5).text
    found = re.findall(r"^llmfleet_gateway_requests_in_flight\{[^}]*\} (\S+)$", text, re.M)
    return sum(float(value) for value in found)


def queued(url: str, key_name: str) -> float:
    text = requests.get(f"{url}/metrics", headers=SCRAPER, timeout=5).text
    found = re.findall(
        rf'^llmfleet_gateway_queued_requests\{{key="{key_name}",model="org/tiny",'
        rf'priority_class="interactive"\}} (\S+)$', text, re.M,
    )  # fmt: skip
    return float(found[0]) if found else 0.0


def raw_stream(url: str, raw_key: str) -> list[str]:
    """A stream's lines as they come, read without the openai client (it hides comments)."""
    lines: list[str] = []
    body = {"model": "org/tiny", "messages": [{"role": "user", "content": "held"}],
            "max_tokens": 3, "stream": True}  # fmt: skip
    with requests.post(f"{url}/v1/chat/completions", json=body, timeout=60, stream=True,
                       headers={"Authorization": f"Bearer {raw_key}"}) as answer:  # fmt: skip
        assert answer.status_code == 200
        for line in answer.iter_lines(decode_unicode=True):
            if line:
                lines.append(line)
    return lines


def test_redis_restarted_mid_flood_loses_nothing_and_answers_no_5xx(settings, tmp_path):
    """Admission keeps nothing in Redis; the keys' limits (which do) fail open meanwhile."""
    with ExitStack() as stack:
        redis_state = stack.enter_context(private_redis(tmp_path))
        plane = stack.enter_context(
            running_control_plane(settings, tmp_path, REDIS_URL=redis_state["url"])
        )
        plane.agent(stack, tmp_path, "a1", *SIM)
        registered("a1")
        tiny = tinymodel.build(tmp_path / "tiny").as_uri()
        actions.register_catalog_model("org/tiny", tiny, size_bytes=1)
        _, key_a = make_api_key("flood", all_models=True, tokens_per_minute=10**6)
        _, key_b = make_api_key("steady", all_models=True, requests_per_minute=10**4)
        flooder, steady = client(key_a, plane.url), client(key_b, plane.url)
        # Loaded by a first request, cold: this process's Celery broker is not the fleet's.
        wait_for(lambda: Agent.objects.get(agent_id="a1").is_routable, 30, "a1 to take work")
        ask(steady)
        pool = stack.enter_context(ThreadPoolExecutor(FLOOD + 2))
        finished: list[float] = []
        flood = [pool.submit(long_stream, flooder, finished) for _ in range(FLOOD)]
        wait_for(lambda: queued(plane.url, "flood") > 0, 20, "the flood held")
        redis_state["process"].kill()
        redis_state["process"].wait()
        answers = [ask(steady) for _ in range(3)]  # Redis away: limits let them in
        redis_state["start"]()
        answers += [ask(steady) for _ in range(3)]
        for done in flood:
            done.result(timeout=60)  # every one of the flood's streams answered in full
        assert len(finished) == FLOOD
        assert len(answers) == 6
        assert queued(plane.url, "flood") == 0
        text = requests.get(f"{plane.url}/metrics", headers=SCRAPER, timeout=5).text
        assert not re.search(r'llmfleet_requests_total\{[^}]*status="5\d\d"\}', text)


def test_requests_held_for_a_cold_start_take_seats_as_warm_ones_do(settings, tmp_path):
    """Six streams wait for a model to load on an engine of 2 sequences: when it serves, one
    starts (the other seat is kept for a light key) and the rest wait their turn in the
    gateway, then every one is answered in full."""
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        plane.agent(stack, tmp_path, "a1", *SIM[:-1], "2")  # --sim-max-num-seqs 2
        registered("a1")
        tiny = tinymodel.build(tmp_path / "tiny").as_uri()
        model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1)
        _, key_a = make_api_key("cold", all_models=True)
        cold = client(key_a, plane.url)
        pool = stack.enter_context(ThreadPoolExecutor(6))
        finished: list[float] = []
        streams = [pool.submit(long_stream, cold, finished) for _ in range(6)]
        for done in streams:
            done.result(timeout=120)
        assert len(finished) == 6
        wait_for(lambda: minutes(model)[0] == 5, 10, "five held for a seat once it served")
        assert in_flight(plane.url) == 0
