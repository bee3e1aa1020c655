"""`/v1/batches`: created from a key's input file, refused with nothing created on bad input;
and the runner on its own (its serving replaced): model by model, journalled once, resumed,
cancelled, expired, its files in OpenAI's shape."""

from __future__ import annotations

import asyncio
import json
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.http import JsonResponse
from django.utils import timezone

from agents.choices import LoadTrigger
from controlplane.gateway import batchactions, batchrun, filestore
from controlplane.gateway.batchinput import BadBatchInput, BatchLine, read_batch_input
from controlplane.gateway.coldstart import Asked
from controlplane.gateway.models import Batch, BatchStatus, StoredFile
from tests.factories import ModelFactory, make_api_key
from tests.gateway.calls import error_of


@pytest.fixture(autouse=True)
def files_here(settings: Any, tmp_path: Path) -> None:
    settings.VAR_DIR = tmp_path
    settings.FILES_STORE = ""


def line(custom_id: str, model: str = "org/m", url: str = "/v1/chat/completions") -> str:
    body = {"model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": f"question {custom_id}"}]}  # fmt: skip
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body})


def uploaded(client: Any, raw_key: str, lines: list[str]) -> str:
    answer = client.post(
        "/v1/files",
        {"purpose": "batch", "file": SimpleUploadedFile("in.jsonl", "\n".join(lines).encode())},
        HTTP_AUTHORIZATION=f"Bearer {raw_key}",
    )
    assert answer.status_code == 200, answer.content
    return str(answer.json()["id"])


def create(client: Any, raw_key: str, **body: Any) -> Any:
    return client.post("/v1/batches", json.dumps(body), content_type="application/json",
                       HTTP_AUTHORIZATION=f"Bearer {raw_key}")  # fmt: skip


@pytest.mark.django_db
def test_a_batch_is_created_listed_retrieved_and_cancelled_by_its_key(client):
    ModelFactory(model_id="org/m")
    _, raw = make_api_key("owner")
    _, other = make_api_key("other")
    file_id = uploaded(client, raw, [line("a"), line("b")])
    answer = create(client, raw, input_file_id=file_id, endpoint="/v1/chat/completions",
                    completion_window="24h", metadata={"job": "nightly"})  # fmt: skip
    assert answer.status_code == 200, answer.content
    made = answer.json()
    assert made["object"] == "batch"
    assert (made["status"], made["input_file_id"], made["metadata"]) == (
        "validating",
        file_id,
        {"job": "nightly"},
    )
    assert made["request_counts"] == {"total": 2, "completed": 0, "failed": 0}
    assert made["expires_at"] - made["created_at"] == 86400
    auth = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    assert client.get(f"/v1/batches/{made['id']}", **auth).json() == made
    assert [b["id"] for b in client.get("/v1/batches", **auth).json()["data"]] == [made["id"]]
    found = client.get(f"/v1/batches/{made['id']}", HTTP_AUTHORIZATION=f"Bearer {other}")
    assert error_of(found, 404)["code"] == "batch_not_found"
    cancelled = client.post(f"/v1/batches/{made['id']}/cancel", **auth).json()
    assert cancelled["status"] == "cancelling"
    assert cancelled["cancelling_at"] is not None


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "status", "param", "told"),
    [
        ({}, 400, "input_file_id", "input_file_id is required"),
        ({"input_file_id": "file-nope"}, 404, "input_file_id", "No such File object"),
        ({"endpoint": "/v1/images"}, 400, "endpoint", "endpoint must be one of"),
        ({"completion_window": "1h"}, 400, "completion_window", "completion_window must be 24h"),
        ({"metadata": {"k": 1}}, 400, "metadata", "metadata is at most 16 pairs"),
        ({"metadata": {"k": "\x00"}}, 400, "metadata", "metadata is at most 16 pairs"),
        ({"input_file_id": "file-\x00"}, 404, "input_file_id", "No such File object"),
        (
            {"endpoint": "/v1/completions"},
            400,
            "input_file_id",
            "Line 1: url /v1/chat/completions is not the batch's endpoint",
        ),
    ],
)
def test_bad_batches_are_refused_with_nothing_created(client, body, status, param, told):
    ModelFactory(model_id="org/m")
    _, raw = make_api_key("owner")
    file_id = uploaded(client, raw, [line("a")])
    asked = {"input_file_id": file_id, "endpoint": "/v1/chat/completions",
             "completion_window": "24h", **body}  # fmt: skip
    if body == {}:
        del asked["input_file_id"]
    error = error_of(create(client, raw, **asked), status)
    assert error["param"] == param
    assert told in error["message"], error["message"]
    assert not Batch.objects.exists()


@pytest.mark.django_db
def test_another_keys_file_makes_no_batch(client):
    ModelFactory(model_id="org/m")
    _, owner = make_api_key("owner")
    _, other = make_api_key("other")
    file_id = uploaded(client, owner, [line("a")])
    answer = create(client, other, input_file_id=file_id, endpoint="/v1/chat/completions",
                    completion_window="24h")  # fmt: skip
    assert error_of(answer, 404)["code"] == "file_not_found"
    assert not Batch.objects.exists()


async def test_a_large_input_file_is_read_without_holding_the_event_loop():
    """A web process reads a batch's file in the loop that serves its requests: in slices,
    the loop running others between them."""
    data = "".join(line(f"c{n}") + "\n" for n in range(5000)).encode()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    running = asyncio.ensure_future(ticker())
    read = await read_batch_input(data, 4096)
    running.cancel()
    assert len(read.lines) == 5000
    assert read.lines[-1].custom_id == "c4999"
    assert ticks > 5  # 5,000 lines take tens of milliseconds: many slices
    twice = "".join(line(f"c{n}") + "\n" for n in range(4000)) + line("c3")
    with pytest.raises(BadBatchInput, match="Line 4001: the custom_id `c3` is used twice"):
        await read_batch_input(twice.encode(), 4096)


def test_lines_go_model_by_model_in_the_files_order():
    lines = [BatchLine(n, f"c{n}", "/v1/chat/completions", {"model": model})
             for n, model in enumerate(["b", "a", "b", "c", "a"], start=1)]  # fmt: skip
    assert [line.number for line in batchrun.by_model(lines)] == [1, 3, 2, 5, 4]


# --- the runner, its serving replaced -------------------------------------------------------


class Engine:
    """What the runner's lines get: 200 with an echo, 400 for a line asking for it, a refusal
    for want of room the first time a line asks for that."""

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.busy_once: set[str] = set()
        self.asked: list[Asked] = []
        self.on_no_idle_capacity = lambda: None

    async def serve(self, key: Any, line: BatchLine, request_id: str, asked: Asked) -> JsonResponse:
        self.sent.append(line.custom_id)
        self.asked.append(asked)
        if line.custom_id.startswith("idle") and asked.min_idle_seconds > 0:
            self.on_no_idle_capacity()
            return JsonResponse(
                {"error": {"message": "No idle capacity", "code": "no_idle_capacity"}}, status=503
            )
        if line.custom_id.startswith("nohost"):
            return JsonResponse(
                {"error": {"message": "No GPU host can take it", "code": "model_not_ready"}},
                status=503,
            )
        if line.custom_id.startswith("bad"):
            return JsonResponse({"error": {"message": "no", "code": "bad_request"}}, status=400)
        if line.custom_id.startswith("busy") and line.custom_id not in self.busy_once:
            self.busy_once.add(line.custom_id)
            return JsonResponse({"error": {"message": "full", "code": "queue_full"}}, status=429)
        return JsonResponse({"id": f"chatcmpl-{line.custom_id}", "model": line.model_id})


def batch_of(client: Any, lines: list[str]) -> Batch:
    ModelFactory(model_id="org/m")
    ModelFactory(model_id="org/n")
    _, raw = make_api_key("owner")
    file_id = uploaded(client, raw, lines)
    made = create(client, raw, input_file_id=file_id, endpoint="/v1/chat/completions",
                  completion_window="24h").json()  # fmt: skip
    return Batch.objects.get(batch_id=made["id"])


def file_lines(file_pk: int | None) -> list[dict[str, Any]]:
    if file_pk is None:
        return []
    stored = StoredFile.objects.get(pk=file_pk)
    return [json.loads(row) for row in filestore.current().get(stored.file_id).splitlines()]


@pytest.mark.django_db(transaction=True)
def test_a_batch_runs_to_its_files_each_line_once(client, monkeypatch):
    engine = Engine()
    monkeypatch.setattr(batchrun, "_serve", engine.serve)
    monkeypatch.setattr(batchrun, "_RETRY_PAUSE_SECONDS", 0.01)
    batch = batch_of(client, [line("a"), line("x", "org/n"), line("bad1"), line("busy1"),
                              line("b"), line("y", "org/n")])  # fmt: skip
    batchrun.run(batch.pk)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED
    assert (batch.total, batch.completed, batch.failed) == (6, 5, 1)
    # Model by model; the busy line once more, after it was refused for want of room.
    assert engine.sent == ["a", "bad1", "busy1", "b", "x", "y", "busy1"]
    output = file_lines(batch.output_file_id)
    assert [row["custom_id"] for row in output] == ["a", "x", "busy1", "b", "y"]  # input order
    assert output[0]["response"]["status_code"] == 200
    assert output[0]["response"]["body"]["id"] == "chatcmpl-a"
    assert output[0]["id"].startswith("batch_req_")
    assert output[0]["error"] is None
    (failed,) = file_lines(batch.error_file_id)
    assert failed["custom_id"] == "bad1"
    assert failed["response"]["status_code"] == 400
    assert failed["error"] == {"code": "bad_request", "message": "no"}
    files = StoredFile.objects.filter(purpose="batch_output", api_key=batch.api_key)
    assert files.count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_finalize_that_died_is_finished_without_writing_a_file_twice(client, monkeypatch):
    engine = Engine()
    monkeypatch.setattr(batchrun, "_serve", engine.serve)
    batch = batch_of(client, [line("a"), line("bad1")])
    real = batchactions._write_file

    def dies_on_the_errors(batch: Any, runner: str, key: Any, field: str, *rest: Any) -> None:
        if field == "error_file":
            raise RuntimeError("the worker died here")
        real(batch, runner, key, field, *rest)

    monkeypatch.setattr(batchactions, "_write_file", dies_on_the_errors)
    with pytest.raises(RuntimeError):
        batchrun.run(batch.pk)
    died = Batch.objects.get(pk=batch.pk)
    assert died.status == BatchStatus.FINALIZING
    assert died.output_file_id is not None  # kept as soon as it was written
    assert died.error_file_id is None
    monkeypatch.setattr(batchactions, "_write_file", real)
    Batch.objects.filter(pk=batch.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    assert batchactions.stalled() == [batch.pk]
    batchrun.run(batch.pk)  # resumed: the errors file only, nothing sent again
    done = Batch.objects.get(pk=batch.pk)
    assert done.status == BatchStatus.COMPLETED
    assert done.output_file_id == died.output_file_id
    assert engine.sent == ["a", "bad1"]
    assert StoredFile.objects.filter(purpose="batch_output").count() == 2


@pytest.mark.django_db(transaction=True)
def test_a_resumed_batch_skips_every_journalled_line(client, monkeypatch):
    engine = Engine()
    monkeypatch.setattr(batchrun, "_serve", engine.serve)
    batch = batch_of(client, [line("a"), line("b"), line("c")])
    assert batchactions.claim(batch.pk, "dead")
    batchactions.start(batch.pk, "dead")
    assert batchactions.journal(batch.pk, "dead", "a", 1, 200, {"id": "earlier"}, "req_1")
    # The runner died: its hold lapses, another takes it.
    Batch.objects.filter(pk=batch.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    assert batchactions.stalled() == [batch.pk]
    batchrun.run(batch.pk)
    assert engine.sent == ["b", "c"]
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED
    assert [row["custom_id"] for row in file_lines(batch.output_file_id)] == ["a", "b", "c"]
    assert file_lines(batch.output_file_id)[0]["response"]["body"] == {"id": "earlier"}


@pytest.mark.django_db(transaction=True)
def test_a_batch_held_by_a_live_runner_is_not_taken(client, monkeypatch):
    engine = Engine()
    monkeypatch.setattr(batchrun, "_serve", engine.serve)
    batch = batch_of(client, [line("a")])
    assert batchactions.claim(batch.pk, "first")
    batchrun.run(batch.pk)  # another task for the same batch: it holds off
    assert engine.sent == []
    assert batchactions.journal(batch.pk, "first", "a", 1, 200, {}, "")
    assert not batchactions.journal(batch.pk, "first", "a", 1, 200, {}, "")  # never twice
    # A runner that stalled past its hold and was replaced writes nothing more.
    Batch.objects.filter(pk=batch.pk).update(lease_until=timezone.now() - timedelta(seconds=1))
    assert batchactions.claim(batch.pk, "second")
    with pytest.raises(batchactions.NotHeld):
        batchactions.journal(batch.pk, "first", "b", 2, 200, {}, "")
    with pytest.raises(batchactions.NotHeld):
        batchactions.finalize(batch.pk, "first")
    assert Batch.objects.get(pk=batch.pk).status == BatchStatus.VALIDATING


@pytest.mark.django_db(transaction=True)
def test_a_cancelled_batch_sends_nothing_new_and_ends_cancelled(client, monkeypatch):
    engine = Engine()
    monkeypatch.setattr(batchrun, "_serve", engine.serve)
    batch = batch_of(client, [line("a"), line("b")])
    batchactions.cancel(batch)
    batchrun.run(batch.pk)
    batch.refresh_from_db()
    assert engine.sent == []
    assert batch.status == BatchStatus.CANCELLED
    assert batch.cancelled_at is not None
    assert (batch.output_file_id, batch.error_file_id) == (None, None)


@pytest.mark.django_db(transaction=True)
def test_an_expired_batch_puts_its_unrun_lines_in_the_error_file(client, monkeypatch):
    engine = Engine()
    monkeypatch.setattr(batchrun, "_serve", engine.serve)
    batch = batch_of(client, [line("a"), line("b")])
    Batch.objects.filter(pk=batch.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    batchrun.run(batch.pk)
    batch.refresh_from_db()
    assert engine.sent == []
    assert batch.status == BatchStatus.EXPIRED
    errors = file_lines(batch.error_file_id)
    assert [row["custom_id"] for row in errors] == ["a", "b"]
    assert {row["error"]["code"] for row in errors} == {"batch_expired"}
    assert {row["response"] for row in errors} == {None}


@pytest.mark.django_db(transaction=True)
def test_a_model_that_cannot_start_fails_its_lines_after_a_few_tries(client, monkeypatch):
    engine = Engine()
    monkeypatch.setattr(batchrun, "_serve", engine.serve)
    monkeypatch.setattr(batchrun, "_RETRY_PAUSE_SECONDS", 0.01)
    batch = batch_of(client, [line("nohost1"), line("a")])
    batchrun.run(batch.pk)
    batch.refresh_from_db()
    assert engine.sent.count("nohost1") == batchrun._MOST_TRIES
    assert batch.status == BatchStatus.COMPLETED
    (failed,) = file_lines(batch.error_file_id)
    assert failed["response"]["status_code"] == 503
    assert failed["error"]["code"] == "model_not_ready"


@pytest.mark.django_db
def test_an_input_file_a_running_batch_reads_may_not_be_deleted(client):
    ModelFactory(model_id="org/m")
    _, raw = make_api_key("owner")
    file_id = uploaded(client, raw, [line("a")])
    create(client, raw, input_file_id=file_id, endpoint="/v1/chat/completions",
           completion_window="24h")  # fmt: skip
    refused = client.delete(f"/v1/files/{file_id}", HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert error_of(refused, 400)["code"] == "file_in_use"
    assert StoredFile.objects.filter(file_id=file_id).exists()


@pytest.mark.django_db(transaction=True)
def test_a_model_without_idle_capacity_waits_while_the_others_go_on(client, monkeypatch, settings):
    engine = Engine()
    monkeypatch.setattr(batchrun, "_serve", engine.serve)
    monkeypatch.setattr(batchrun, "_RETRY_PAUSE_SECONDS", 0.01)
    monkeypatch.setattr(batchrun, "_IDLE_RECHECK_SECONDS", 0.3)
    settings.BATCH_IDLE_EVICT_SECONDS = 300

    def deadline_near() -> None:  # the window's idle-only part ends after the first refusal
        settings.BATCH_IDLE_WAIT_PERCENT = 0

    engine.on_no_idle_capacity = deadline_near
    batch = batch_of(client, [line("idle1", model="org/n"), line("idle2", model="org/n"),
                              line("a"), line("b")])  # fmt: skip
    batchrun.run(batch.pk)
    batch.refresh_from_db()
    assert batch.status == BatchStatus.COMPLETED
    assert (batch.completed, batch.failed) == (4, 0)  # waiting for capacity never fails a line
    # Its first lines found no idle capacity: the other model's went first, theirs later,
    # once the batch's deadline needed the capacity (a load that may step models down).
    assert engine.sent[0] == "idle1"
    assert engine.sent[-1] == "idle1"
    assert engine.sent.count("idle1") == 2
    assert engine.sent.index("b") < len(engine.sent) - 1
    assert engine.asked[0] == Asked(LoadTrigger.BATCH, 300.0)
    assert engine.asked[-1] == Asked(LoadTrigger.BATCH, 0.0)
