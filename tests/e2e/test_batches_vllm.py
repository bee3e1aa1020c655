"""A small batch with real vLLM on the CPU: chat lines and embeddings lines, each batch
cold-starting its model once, every line answered by the engine in the output file."""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from typing import Any

import openai
import pytest

from agents import actions
from agents.choices import LoadEventKind, ModelKind
from agents.models import Agent, LoadEvent
from nodeagent import tinymodel
from tests.e2e.agent_process import engine_python
from tests.e2e.fleet import running_control_plane
from tests.e2e.test_vllm_agent import CPU_ARGS
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def lines(url: str, bodies: list[dict[str, object]]) -> bytes:
    return "".join(
        json.dumps({"custom_id": f"r{n}", "method": "POST", "url": url, "body": body}) + "\n"
        for n, body in enumerate(bodies)
    ).encode()


def run(client: openai.OpenAI, url: str, content: bytes) -> list[dict[str, Any]]:
    made = client.files.create(file=("in.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=made.id, endpoint=url, completion_window="24h")  # type: ignore[arg-type]
    deadline = time.monotonic() + 400
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch
        time.sleep(1)
    assert batch.status == "completed", batch
    assert batch.error_file_id is None
    assert batch.output_file_id is not None
    text = client.files.content(batch.output_file_id).text
    return [json.loads(line) for line in text.splitlines()]


def test_a_chat_batch_and_an_embeddings_batch_on_real_vllm(settings, tmp_path):
    tiny = tinymodel.build(tmp_path / "tiny").as_uri()
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        plane.agent(stack, tmp_path, "cpu-1", "--engine", "vllm", "--engine-python",
                    engine_python())  # fmt: skip
        wait_for(lambda: Agent.objects.filter(agent_id="cpu-1").exists(), 30, "registration")
        wait_for(lambda: "ready." in plane.log("batcher"), 60, "the batches worker")
        actions.register_catalog_model("org/tiny", tiny, size_bytes=1, engine_args=CPU_ARGS)
        actions.register_catalog_model("org/tiny-embed", tiny, size_bytes=1,
                                       engine_args=CPU_ARGS, kind=ModelKind.EMBEDDING)  # fmt: skip
        _, raw_key = make_api_key("vllm-batches")
        client = openai.OpenAI(base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0,
                               timeout=300)  # fmt: skip

        chats: list[dict[str, object]] = [
            {"model": "org/tiny", "max_tokens": 4, "temperature": 0, "ignore_eos": True,
             "messages": [{"role": "user", "content": f"Hello {n}"}]}
            for n in range(6)
        ]  # fmt: skip
        answered = run(client, "/v1/chat/completions", lines("/v1/chat/completions", chats))
        assert [row["custom_id"] for row in answered] == [f"r{n}" for n in range(6)]
        for row in answered:
            response = row["response"]
            assert response["status_code"] == 200
            assert response["body"]["usage"]["completion_tokens"] == 4

        inputs: list[dict[str, object]] = [
            {"model": "org/tiny-embed", "input": f"word {n}"} for n in range(5)
        ]
        embedded = run(client, "/v1/embeddings", lines("/v1/embeddings", inputs))
        assert len(embedded) == 5
        for row in embedded:
            body = row["response"]["body"]
            assert len(body["data"][0]["embedding"]) > 0

        # Each batch cold-started its model once, however many lines waited for it.
        for model_id in ("org/tiny", "org/tiny-embed"):
            loads = LoadEvent.objects.filter(kind=LoadEventKind.LOAD, model__model_id=model_id)
            assert loads.count() == 1, model_id
