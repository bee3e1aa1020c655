"""The gateway for real: the web process (uvicorn), a node agent and the official openai client:
answers and streams of every API, errors, failover and disconnects. Usage, limits, affinity
and a stopping web process are in tests/e2e/test_gateway_limits.py; the shared fixtures in
tests/e2e/conftest.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import requests

from agents.choices import CacheLevel, ModelKind, PlacementState
from agents.models import Agent, Model, Placement
from nodeagent import tinymodel
from nodeagent.engines.simanswers import words_for
from tests.e2e.agent_process import enrolment_for, running_agent
from tests.e2e.gateway_support import usage_of
from tests.factories import make_api_key
from tests.support import free_port, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_chat_and_completions_stream_and_not(client, warm_model):
    messages = [{"role": "user", "content": "hello there"}]
    expected = " ".join(words_for("hello there", 6))

    answer = client.chat.completions.create(model="org/tiny", messages=messages, max_tokens=6)
    assert answer.choices[0].message.content == expected
    assert answer.usage.completion_tokens == 6

    stream = client.chat.completions.create(
        model="org/tiny",
        messages=messages,
        max_tokens=6,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == 6

    text = client.completions.create(model="org/tiny", prompt="once upon", max_tokens=4)
    assert text.choices[0].text == " ".join(words_for("once upon", 4))
    streamed = client.completions.create(
        model="org/tiny", prompt="once upon", max_tokens=4, stream=True
    )
    assert "".join(c.choices[0].text for c in streamed) == " ".join(words_for("once upon", 4))

    listed = {model.id: model.model_extra["warm"] for model in client.models.list()}
    assert listed == {"org/tiny": True}


def test_errors_reach_the_openai_client_with_their_status(client, warm_model):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="org/none", messages=[{"role": "user", "content": "x"}]
        )
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(
            model="org/tiny", messages=[{"role": "user", "content": "x"}], max_tokens=0
        )
    assert raised.value.body["param"] == "max_tokens"


def test_an_unreachable_replica_is_skipped_before_the_first_byte(client, warm_model):
    dead = Agent.objects.create(agent_id="gpu-dead", base_url=f"http://127.0.0.1:{free_port()}")
    Placement.objects.create(
        agent=dead, model=Model.objects.get(), state=PlacementState.READY,
        inference_endpoint_url=f"{dead.base_url}/models/org/tiny",
    )  # fmt: skip
    for number in range(8):  # different users: some prefer the dead replica first
        answer = client.chat.completions.create(
            model="org/tiny",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=2,
            user=f"user-{number}",
        )
        assert answer.choices[0].message.content


def test_a_client_that_disconnects_mid_stream_frees_the_engine(gateway, warm_model):
    _, raw_key = make_api_key("disconnect")
    body = {
        "model": "org/tiny",
        "messages": [{"role": "user", "content": "x"}],
        "max_tokens": 20000,
        "stream": True,
    }
    response = requests.post(
        f"{gateway}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {raw_key}"},
        stream=True, timeout=30,
    )  # fmt: skip
    # Keep the iterator: a discarded one is collected, and requests closes the connection.
    lines = response.iter_lines()
    assert response.status_code == 200
    assert next(lines).startswith(b"data: ")
    model = warm_model.heartbeat()["models"][0]
    assert model["requests_in_flight"] == 1
    response.close()

    def idle() -> bool:
        model = warm_model.heartbeat()["models"][0]
        return model["requests_in_flight"] == 0 and model["requests_running"] == 0

    wait_for(idle, 10, "the engine request to be cancelled")


def test_a_burst_of_a_thousand_requests_loses_nothing(client, warm_model):
    def ask(number: int) -> tuple[str, str]:
        prompt = f"question {number}"
        answer = client.chat.completions.create(
            model="org/tiny", messages=[{"role": "user", "content": prompt}], max_tokens=3
        )
        return answer.choices[0].message.content, " ".join(words_for(prompt, 3))

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(ask, range(1000)))
    assert len(results) == 1000
    assert all(got == expected for got, expected in results)


def test_openai_client_models_list_needs_a_key(gateway):
    anonymous = openai.OpenAI(base_url=f"{gateway}/v1", api_key="llmf-nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def _serve_embeddings(agent, source: str) -> Model:
    """org/tiny-embed, the same checkpoint as an embedding model, READY on `agent`."""
    load = {"model_id": "org/tiny-embed", "source": source,
            "engine": {"args": ["--runner", "pooling"]}}  # fmt: skip
    loaded = agent.post("/load_model", load).json()
    model = Model.objects.create(model_id="org/tiny-embed", source=source, kind=ModelKind.EMBEDDING)
    Placement.objects.create(
        agent=Agent.objects.get(), model=model, state=PlacementState.READY,
        cache_level=CacheLevel.GPU_RESIDENT,
        inference_endpoint_url=loaded["inference_endpoint_url"],
    )  # fmt: skip
    return model


def test_responses_stream_and_not_with_their_usage(client, warm_model):
    expected = " ".join(words_for("hello there", 6))
    answer = client.responses.create(model="org/tiny", input="hello there", max_output_tokens=6)
    assert answer.output_text == expected
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (2, 6)

    stream = client.responses.create(
        model="org/tiny", instructions="be brief", max_output_tokens=4, stream=True,
        input=[{"role": "user", "content": "hello there"}], extra_body={"keep_alive": "2m"},
    )  # fmt: skip
    events = list(stream)
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]  # fmt: skip
    assert kinds[4:8] == ["response.output_text.delta"] * 4
    assert kinds[-1] == "response.completed"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert (
        text == " ".join(words_for("be brief\nhello there", 4)) == events[-1].response.output_text
    )
    assert events[-1].response.usage.output_tokens == 4

    usage = usage_of(requests=2)
    assert (usage.prompt_tokens, usage.completion_tokens) == (2 + 4, 6 + 4)
    placement = Placement.objects.get(model__model_id="org/tiny")
    wait_for(lambda: Placement.objects.get(pk=placement.pk).keep_alive is not None, 10,
             "the keep_alive")  # fmt: skip
    assert Placement.objects.get(pk=placement.pk).keep_alive.total_seconds() == 120

    with pytest.raises(openai.NotFoundError, match="does not store responses"):
        client.responses.retrieve(answer.id)
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model="org/tiny", input="more", previous_response_id=answer.id)


def test_embeddings_of_one_and_several_inputs_in_both_encodings(client, warm_model, tmp_path):
    from nodeagent.engines.simanswers import EMBEDDING_DIMENSIONS, embedding_for

    _serve_embeddings(warm_model, (tmp_path / "tiny").as_uri())
    one = client.embeddings.create(model="org/tiny-embed", input="hello", encoding_format="float")
    assert one.data[0].embedding == pytest.approx(embedding_for("hello"))
    assert one.usage.prompt_tokens == 1
    # The SDK's default asks for base64 and decodes it: the same vectors, a quarter the bytes.
    several = client.embeddings.create(model="org/tiny-embed", input=["hello", "paris is big"])
    assert [item.index for item in several.data] == [0, 1]
    assert several.data[0].embedding == pytest.approx(embedding_for("hello"), abs=1e-6)
    assert len(several.data[1].embedding) == EMBEDDING_DIMENSIONS
    tokens = client.embeddings.create(model="org/tiny-embed", input=[[1, 2, 3], [4]])
    assert len(tokens.data) == 2

    listed = {model.id: model.model_extra["kind"] for model in client.models.list()}
    assert listed == {"org/tiny": "generate", "org/tiny-embed": "embedding"}
    assert client.models.retrieve("org/tiny-embed").model_extra["kind"] == "embedding"
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(
            model="org/tiny-embed", messages=[{"role": "user", "content": "hi"}]
        )
    with pytest.raises(openai.BadRequestError, match="is a text generation model"):
        client.embeddings.create(model="org/tiny", input="hello")


def test_through_the_gateway_to_real_vllm(gateway, settings, tmp_path):
    """Once with the real engine: vLLM on the CPU serving the tiny checkpoint."""
    from tests.e2e.agent_process import engine_python
    from tests.e2e.test_vllm_agent import CPU_ARGS, LOAD_TIMEOUT

    tiny = tinymodel.build(tmp_path / "tiny")
    python = engine_python()
    credential, enrolled = enrolment_for("cpu-1")
    with running_agent(
        tmp_path, "--engine", "vllm", "--engine-python", python, token=credential
    ) as agent:
        load = {"model_id": "org/tiny", "source": tiny.as_uri(), "engine": {"args": CPU_ARGS}}
        loaded = agent.post("/load_model", load, timeout=LOAD_TIMEOUT)
        assert loaded.status_code == 200, loaded.text
        model = Model.objects.create(model_id="org/tiny", source=tiny.as_uri())
        host = Agent.objects.create(agent_id="cpu-1", base_url=agent.url, **enrolled)
        Placement.objects.create(
            agent=host, model=model, state=PlacementState.READY,
            inference_endpoint_url=loaded.json()["inference_endpoint_url"],
        )  # fmt: skip
        _, raw_key = make_api_key("vllm")
        client = openai.OpenAI(base_url=f"{gateway}/v1", api_key=raw_key, max_retries=0)
        stream = client.chat.completions.create(
            model="org/tiny",
            messages=[{"role": "user", "content": "Hello"}],
            max_tokens=8,
            stream=True,
            extra_body={"ignore_eos": True},  # a vLLM parameter, passed through untouched
        )
        chunks = list(stream)
        assert sum(1 for chunk in chunks if chunk.choices and chunk.choices[0].delta.content) >= 2
        answer = client.completions.create(
            model="org/tiny", prompt="Hello", max_tokens=5, extra_body={"ignore_eos": True}
        )
        assert answer.usage.completion_tokens == 5

        # vLLM's Responses API through the gateway, both ways.
        response = client.responses.create(
            model="org/tiny", input="Hello", max_output_tokens=4, extra_body={"ignore_eos": True}
        )
        assert response.usage.output_tokens == 4
        assert response.output_text
        events = list(
            client.responses.create(
                model="org/tiny", input=[{"role": "user", "content": "Hello"}],
                max_output_tokens=4, stream=True, extra_body={"ignore_eos": True},
            )
        )  # fmt: skip
        kinds = [event.type for event in events]
        assert kinds[0] == "response.created"
        assert "response.output_text.delta" in kinds
        assert kinds[-1] == "response.completed"
        assert events[-1].response.usage.output_tokens == 4

        # The same checkpoint as an embedding model: its engine is vLLM's pooling runner.
        embed = {"model_id": "org/tiny-embed", "source": tiny.as_uri(),
                 "engine": {"args": ["--runner", "pooling", *CPU_ARGS]}}  # fmt: skip
        loaded = agent.post("/load_model", embed, timeout=LOAD_TIMEOUT)
        assert loaded.status_code == 200, loaded.text
        embedder = Model.objects.create(
            model_id="org/tiny-embed", source=tiny.as_uri(), kind=ModelKind.EMBEDDING
        )
        Placement.objects.create(
            agent=host, model=embedder, state=PlacementState.READY,
            inference_endpoint_url=loaded.json()["inference_endpoint_url"],
        )  # fmt: skip
        one = client.embeddings.create(
            model="org/tiny-embed", input="Hello", encoding_format="float"
        )
        several = client.embeddings.create(model="org/tiny-embed", input=["Hello", "Paris"])
        assert len(one.data[0].embedding) == 128  # the tiny model's hidden size
        assert [len(item.embedding) for item in several.data] == [128, 128]
        assert several.data[0].embedding == pytest.approx(one.data[0].embedding, abs=1e-4)
        assert one.usage.prompt_tokens >= 1
