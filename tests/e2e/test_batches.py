"""The Batch API for real: web, the three Celery workers, beat, PostgreSQL, Redis, a sim node
agent that logs every request its engine takes, and the official openai client.

A batch runs to its output file, each line once; the batches worker SIGKILLed mid-batch
loses no line and writes none twice (the engine's own log shows no line sent again but those
in flight); a cancel ends it with the files of what ran; a short window expires it."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter
from contextlib import ExitStack
from functools import partial
from pathlib import Path
from typing import Any

import openai
import pytest

from agents import actions
from agents.choices import LoadEventKind, LoadTrigger
from agents.models import LoadEvent
from controlplane.gateway.models import BatchOutcome
from nodeagent import tinymodel
from tests.e2e.fleet import registered, running_control_plane, serving_on
from tests.e2e.injectors import private_redis
from tests.factories import make_api_key
from tests.support import http_ok, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ENDED = ("completed", "failed", "expired", "cancelled")


def sim(log: Path, tpot_ms: int = 1) -> list[str]:
    return ["--engine", "sim", "--sim-load-seconds", "0.2", "--sim-ttft-ms", "5",
            "--sim-tpot-ms", str(tpot_ms), "--sim-request-log", str(log)]  # fmt: skip


def batch_input(count: int, max_tokens: int = 4) -> bytes:
    return "".join(
        json.dumps({"custom_id": f"q-{n}", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "org/tiny", "max_tokens": max_tokens,
                             "messages": [{"role": "user", "content": f"question {n}"}]}})
        + "\n" for n in range(count)
    ).encode()  # fmt: skip


def fleet(
    stack: ExitStack, settings: Any, tmp_path: Path, tpot_ms: int = 1,
    agent_args: tuple[str, ...] = (), serve: bool = True, **env: str,
) -> Any:  # fmt: skip
    plane = stack.enter_context(running_control_plane(settings, tmp_path, 1, **env))
    log = tmp_path / "engine-requests.jsonl"
    agent = plane.agent(stack, tmp_path, "a1", *sim(log, tpot_ms), *agent_args)
    registered("a1")
    tiny = tinymodel.build(tmp_path / "tiny").as_uri()
    model, _ = actions.register_catalog_model("org/tiny", tiny, size_bytes=1)
    if serve:
        serving_on(model, "a1")
    wait_for(lambda: "ready." in plane.log("batcher"), 60, "the batches worker")
    _, raw_key = make_api_key("batches")
    client = openai.OpenAI(base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0)
    return plane, client, log, agent


def until_ended(client: openai.OpenAI, batch_id: str, seconds: float = 120) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        batch = client.batches.retrieve(batch_id)
        if batch.status in ENDED:
            return batch
        time.sleep(0.3)
    raise AssertionError(f"batch {batch_id} did not end within {seconds} s")


def rows(client: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    return [json.loads(line) for line in client.files.content(file_id).text.splitlines()]


def engine_took(log: Path) -> Counter[str]:
    """How often the engine took each question (its own log)."""
    taken: Counter[str] = Counter()
    if log.exists():
        for line in log.read_text().splitlines():
            taken[json.loads(line)["prompt"].rsplit("question ", 1)[-1]] += 1
    return taken


def test_a_batch_runs_to_its_output_file_each_line_once(settings, tmp_path):
    with ExitStack() as stack:
        _, client, log, _ = fleet(stack, settings, tmp_path)
        made = client.files.create(file=("in.jsonl", batch_input(40)), purpose="batch")
        batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        assert batch.status == "validating"
        done = until_ended(client, batch.id)
        assert done.status == "completed", done
        assert (done.request_counts.total, done.request_counts.completed) == (40, 40)
        assert done.error_file_id is None
        output = rows(client, done.output_file_id)
        assert [row["custom_id"] for row in output] == [f"q-{n}" for n in range(40)]
        assert all(row["response"]["status_code"] == 200 for row in output)
        assert all(row["response"]["body"]["choices"][0]["message"]["content"] for row in output)
        assert engine_took(log) == Counter({str(n): 1 for n in range(40)})
        listed = client.files.list()
        assert {entry.purpose for entry in listed} == {"batch", "batch_output"}


def test_the_batches_worker_killed_mid_batch_loses_no_line_and_writes_none_twice(
    settings, tmp_path
):
    lines = 120
    with ExitStack() as stack:
        plane, client, log, _ = fleet(stack, settings, tmp_path, tpot_ms=20, BATCH_CONCURRENCY="8")
        made = client.files.create(file=("in.jsonl", batch_input(lines, 8)), purpose="batch")
        batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        wait_for(lambda: BatchOutcome.objects.count() >= 20, 60, "a part of the batch run")
        plane.kill("batcher", signal.SIGKILL)
        journalled = BatchOutcome.objects.count()
        assert journalled < lines
        plane.start("batcher")  # beat resumes it once its runner's hold lapses
        done = until_ended(client, batch.id, seconds=180)
        assert done.status == "completed", done
        output = rows(client, done.output_file_id)
        assert sorted(row["custom_id"] for row in output) == sorted(f"q-{n}" for n in range(lines))
        took = engine_took(log)
        assert set(took) == {str(n) for n in range(lines)}  # none lost
        again = [question for question, times in took.items() if times > 1]
        # Only lines in flight when the worker died were sent again (their answers were not
        # kept yet): at most the batch's concurrency (8), never a line that was journalled.
        assert len(again) <= 8, again


def test_a_cancelled_batch_ends_with_the_files_of_what_ran(settings, tmp_path):
    with ExitStack() as stack:
        _, client, log, _ = fleet(stack, settings, tmp_path, tpot_ms=50, BATCH_CONCURRENCY="2")
        made = client.files.create(file=("in.jsonl", batch_input(60, 10)), purpose="batch")
        batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        wait_for(lambda: BatchOutcome.objects.count() >= 2, 60, "lines answered")
        assert client.batches.cancel(batch.id).status == "cancelling"
        done = until_ended(client, batch.id)
        assert done.status == "cancelled"
        ran = rows(client, done.output_file_id)
        assert 2 <= len(ran) < 60
        assert len(ran) == done.request_counts.completed
        time.sleep(1)  # nothing more reaches the engine once it is cancelled
        assert sum(engine_took(log).values()) == len(ran)


def test_a_batch_past_its_window_expires_its_unrun_lines(settings, tmp_path):
    with ExitStack() as stack:
        _, client, _, _ = fleet(stack, settings, tmp_path, tpot_ms=50, BATCH_CONCURRENCY="1",
                             BATCH_COMPLETION_WINDOW_SECONDS="3")  # fmt: skip
        made = client.files.create(file=("in.jsonl", batch_input(40, 10)), purpose="batch")
        batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        done = until_ended(client, batch.id)
        assert done.status == "expired"
        ran, expired = rows(client, done.output_file_id), rows(client, done.error_file_id)
        assert len(ran) + len(expired) == 40  # every line in exactly one file
        assert expired
        assert {row["error"]["code"] for row in expired} == {"batch_expired"}


def test_batch_lines_leave_each_engine_its_reserve_for_interactive_requests(settings, tmp_path):
    """The agent lets a batch line into its engine only while its reserve stays free (here 2
    of the engine's 4 seats): the lines wait at the agent, and an interactive request sent
    meanwhile enters at once, ahead of them."""
    with ExitStack() as stack:
        _, client, log, agent = fleet(
            stack, settings, tmp_path, tpot_ms=20, BATCH_CONCURRENCY="8",
            agent_args=("--sim-max-num-seqs", "4", "--batch-reserve-percent", "50"),
        )  # fmt: skip
        made = client.files.create(file=("in.jsonl", batch_input(60, 10)), purpose="batch")
        batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        wait_for(lambda: agent.metric("llmfleet_agent_batch_requests_waiting") > 0, 60,
                 "batch lines waiting at the agent")  # fmt: skip
        held = [agent.metric("llmfleet_agent_requests_in_flight") for _ in range(20)]
        assert max(held) <= 2, held  # the batch's lines never take the reserve
        # An interactive request enters at once, ahead of the batch's lines waiting there.
        answer = client.chat.completions.create(
            model="org/tiny", max_tokens=30, messages=[{"role": "user", "content": "now"}]
        )
        assert answer.choices[0].message.content
        assert agent.metric("llmfleet_agent_batch_requests_waiting") > 0
        done = until_ended(client, batch.id)
        assert done.status == "completed", done
        assert done.request_counts.completed == 60
        took = engine_took(log)
        assert took.pop("now") == 1
        assert took == Counter({str(n): 1 for n in range(60)})


def test_a_batch_whose_cold_start_lost_its_loads_worker_still_runs_each_line_once(
    settings, tmp_path
):
    """The loads worker SIGKILLed while it loads the batch's model: the load is recovered, the
    batch waits for it, and every line runs once."""
    with ExitStack() as stack:
        plane, client, log, _ = fleet(stack, settings, tmp_path, serve=False,
                                   agent_args=("--sim-load-seconds", "4"))  # fmt: skip
        made = client.files.create(file=("in.jsonl", batch_input(30)), purpose="batch")
        batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        started = LoadEvent.objects.filter(kind=LoadEventKind.LOAD, started_at__isnull=False)
        wait_for(started.exists, 60, "the batch's cold start")
        assert started.get().trigger == LoadTrigger.BATCH
        plane.kill("loader")
        plane.start("loader")
        done = until_ended(client, batch.id, seconds=180)
        assert done.status == "completed", done
        assert done.request_counts.completed == 30
        assert engine_took(log) == Counter({str(n): 1 for n in range(30)})


def test_an_engine_that_dies_mid_batch_loses_no_line(settings, tmp_path):
    """The agent serving the batch's model SIGKILLed, its engine with it, while lines run, then
    started again: the lines in flight fail over to the model's next cold start, and every
    line is answered once; sent to an engine again, at most those that were in flight."""
    lines = 60
    with ExitStack() as stack:
        plane, client, log, agent = fleet(
            stack, settings, tmp_path, tpot_ms=20, BATCH_CONCURRENCY="8"
        )
        made = client.files.create(file=("in.jsonl", batch_input(lines, 8)), purpose="batch")
        batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        wait_for(lambda: BatchOutcome.objects.count() >= 10, 60, "a part of the batch run")
        agent.process.kill()
        agent.process.wait()
        assert BatchOutcome.objects.count() < lines
        plane.agent(stack, tmp_path, "a1", *sim(log, 20))
        done = until_ended(client, batch.id, seconds=180)
        assert done.status == "completed", done
        assert (done.request_counts.completed, done.request_counts.failed) == (lines, 0)
        output = rows(client, done.output_file_id)
        assert sorted(row["custom_id"] for row in output) == sorted(f"q-{n}" for n in range(lines))
        took = engine_took(log)
        assert set(took) == {str(n) for n in range(lines)}
        again = [question for question, times in took.items() if times > 1]
        assert len(again) <= 8, again  # only lines the dead engine held


def test_a_batch_goes_on_through_a_redis_and_a_web_restart(settings, tmp_path):
    """Redis (a private one: the machine's is shared) and the web process killed mid-batch:
    the batch's state is PostgreSQL's and its lines go from the batches worker to the
    agents, so lines go on being answered while both are down, and the batch ends with every
    line answered once."""
    lines = 60
    (tmp_path / "redis").mkdir()
    with ExitStack() as stack:
        redis = stack.enter_context(private_redis(tmp_path / "redis"))
        # The batch cold-starts its model: the control plane's processes use the private
        # Redis, this process's Celery client the machine's.
        plane, client, log, _ = fleet(stack, settings, tmp_path, tpot_ms=20, serve=False,
                                      BATCH_CONCURRENCY="4", REDIS_URL=redis["url"])  # fmt: skip
        made = client.files.create(file=("in.jsonl", batch_input(lines, 8)), purpose="batch")
        batch = client.batches.create(input_file_id=made.id, endpoint="/v1/chat/completions",
                                      completion_window="24h")  # fmt: skip
        wait_for(lambda: BatchOutcome.objects.count() >= 5, 60, "a part of the batch run")
        redis["process"].kill()
        redis["process"].wait()
        plane.kill("web")
        down = BatchOutcome.objects.count()
        wait_for(lambda: BatchOutcome.objects.count() >= down + 5, 60,
                 "lines answered while Redis and the web process are down")  # fmt: skip
        redis["start"]()
        plane.start("web")
        wait_for(partial(http_ok, f"{plane.url}/healthz"), 30, "the web process again")
        done = until_ended(client, batch.id, seconds=180)
        assert done.status == "completed", done
        assert (done.request_counts.completed, done.request_counts.failed) == (lines, 0)
        output = rows(client, done.output_file_id)
        assert sorted(row["custom_id"] for row in output) == sorted(f"q-{n}" for n in range(lines))
        assert engine_took(log) == Counter({str(n): 1 for n in range(lines)})
