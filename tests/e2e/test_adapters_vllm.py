"""LoRA adapters with real vLLM on the CPU: the tiny checkpoint and an adapter of it
published to Azure Blob (Azurite), an adapter request that cold-starts its base with LoRA on
and loads the adapter, then the adapter streaming on the warm base; the adapter answers
differently from its base."""

from __future__ import annotations

import io
from contextlib import ExitStack

import openai
import pytest

from agents import actions
from agents.choices import LoadEventKind
from agents.models import Agent, LoadEvent, Placement
from nodeagent import tinymodel
from nodeagent.store.publish import publish
from tests.e2e.agent_process import engine_python
from tests.e2e.fleet import running_control_plane
from tests.e2e.test_vllm_agent import CPU_ARGS
from tests.factories import make_api_key
from tests.support import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PROMPT = [{"role": "user", "content": "Hello"}]


def test_an_adapter_cold_starts_its_base_then_streams_on_the_warm_engine(
    settings, tmp_path, azurite
):
    environ = azurite.environ()
    publish(tinymodel.build(tmp_path / "tiny"), "azure://models/org/tiny", environ,
            stream=io.StringIO())  # fmt: skip
    publish(tinymodel.build_adapter(tmp_path / "lora"), "azure://models/org/tiny-lora", environ,
            stream=io.StringIO())  # fmt: skip
    with ExitStack() as stack:
        plane = stack.enter_context(running_control_plane(settings, tmp_path))
        agent = plane.agent(
            stack, tmp_path, "cpu-1", "--engine", "vllm", "--engine-python", engine_python(),
            extra_env=environ,
        )  # fmt: skip
        wait_for(lambda: Agent.objects.filter(agent_id="cpu-1").exists(), 30, "registration")
        actions.register_catalog_model(
            "org/tiny", "azure://models/org/tiny", size_bytes=1, engine_args=CPU_ARGS
        )
        actions.register_catalog_model(
            "org/tiny-lora", "azure://models/org/tiny-lora", size_bytes=1, base="org/tiny",
            adapter_rank=8,
        )  # fmt: skip
        _, raw_key = make_api_key("vllm")
        client = openai.OpenAI(
            base_url=f"{plane.url}/v1", api_key=raw_key, max_retries=0, timeout=300
        )

        def answer(model: str) -> list[int]:
            """The answer's token ids (greedy): the tiny model's text is often bytes that do
            not decode alone, so ids, not text, tell two models apart."""
            completion = client.chat.completions.create(
                model=model, messages=PROMPT, max_tokens=8, temperature=0,
                extra_body={"ignore_eos": True, "return_token_ids": True},
            )  # fmt: skip
            assert completion.model == model
            ids = completion.choices[0].model_extra["token_ids"]
            assert len(ids) == 8
            return list(ids)

        adapted = answer("org/tiny-lora")  # cold: the base starts with LoRA, then the adapter
        load = LoadEvent.objects.get(kind=LoadEventKind.LOAD)
        assert load.model.model_id == "org/tiny"
        placement = Placement.objects.get()
        assert (placement.max_loras, placement.max_lora_rank) == (4, 8)

        stream = client.chat.completions.create(
            model="org/tiny-lora", messages=PROMPT, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        )  # fmt: skip
        chunks = list(stream)
        assert {chunk.model for chunk in chunks} == {"org/tiny-lora"}
        usage = chunks[-1].usage
        assert usage is not None
        assert usage.completion_tokens == 8
        assert answer("org/tiny-lora") == adapted  # greedy: the same tokens, warm
        assert answer("org/tiny") != adapted  # the base says something else
        assert agent.metric('llmfleet_agent_adapter_loads_total{outcome="loaded"}') == 1
        assert LoadEvent.objects.filter(kind=LoadEventKind.LOAD).count() == 1
