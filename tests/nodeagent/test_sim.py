from __future__ import annotations

import json

import pytest
from aiohttp.test_utils import TestClient, TestServer

from nodeagent.config import SimSettings
from nodeagent.engines.simanswers import words_for
from nodeagent.engines.simcache import PrefixCache
from nodeagent.engines.simprefill import BUCKETS, TtftHistogram
from nodeagent.engines.simserver import SimServer
from nodeagent.kvblocks import word_ids
from nodeagent.metrics import parse_engine_metrics


@pytest.fixture
async def sim():
    server = SimServer(
        "org/sim", SimSettings(load_seconds=0, ttft_ms=1, tpot_ms=1, wake_seconds=0.05)
    )
    async with TestClient(TestServer(server.app())) as client:
        yield server, client


def chat(**extra):
    return {
        "model": "org/sim",
        "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 5,
    } | extra


async def read_events(response) -> list[str]:
    text = (await response.read()).decode()
    return [line.removeprefix("data: ") for line in text.split("\n\n") if line.startswith("data: ")]


async def test_text_is_deterministic_and_as_long_as_asked(sim):
    _, client = sim
    first = await (await client.post("/v1/chat/completions", json=chat())).json()
    second = await (await client.post("/v1/chat/completions", json=chat())).json()
    content = first["choices"][0]["message"]["content"]
    assert (
        content
        == second["choices"][0]["message"]["content"]
        == " ".join(words_for("hello there", 5))
    )
    assert first["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}
    assert first["object"] == "chat.completion"


async def test_chat_streams_sse_with_usage_and_done(sim):
    _, client = sim
    response = await client.post(
        "/v1/chat/completions", json=chat(stream=True, stream_options={"include_usage": True})
    )
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = await read_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(
        chunk["choices"][0]["delta"].get("content", "") for chunk in chunks if chunk["choices"]
    )
    assert text == " ".join(words_for("hello there", 5))
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


async def test_completions_stream_without_usage_unless_asked(sim):
    _, client = sim
    body = {"model": "org/sim", "prompt": "once upon", "max_tokens": 3, "stream": True}
    chunks = [
        json.loads(e)
        for e in (await read_events(await client.post("/v1/completions", json=body)))[:-1]
    ]
    assert len(chunks) == 3
    assert all("usage" not in chunk for chunk in chunks)
    assert chunks[0]["object"] == "text_completion"


@pytest.mark.parametrize(
    ("body", "status"),
    [
        ("{oops", 400),
        ({"model": "other", "messages": []}, 404),
        ({"model": "org/sim", "max_tokens": 0}, 400),
    ],
)
async def test_bad_requests(sim, body, status):
    _, client = sim
    kwargs = {"data": body} if isinstance(body, str) else {"json": body}
    response = await client.post("/v1/chat/completions", **kwargs)
    assert response.status == status
    assert "message" in (await response.json())["error"]


async def test_metrics_use_vllm_names_and_count_prefix_hits(sim):
    _, client = sim
    long = [{"role": "user", "content": " ".join(f"w{n}" for n in range(32))}]  # two blocks
    await client.post("/v1/chat/completions", json=chat(messages=long))
    await client.post("/v1/chat/completions", json=chat(messages=long))
    stats = parse_engine_metrics(await (await client.get("/metrics")).text())
    assert stats.requests_running == 0
    assert stats.kv_cache_usage == 0
    assert stats.kv_cache_hit_rate == 0.5  # the second identical prompt hit


def words(prefix: str, count: int) -> list[str]:
    return [f"{prefix}{n}" for n in range(count)]


def test_the_prefix_cache_hits_leading_blocks_only_keyed_by_model():
    cache = PrefixCache(block_tokens=4, capacity=100)
    system = words("s", 8)  # two blocks
    assert cache.serve(system + words("a", 5), "m") == 0
    assert cache.serve(system + words("b", 5), "m") == 8  # the shared two blocks; b's own not
    assert cache.serve(words("x", 4) + system, "m") == 0  # the same blocks later: no hit
    assert cache.serve(system + words("a", 5), "m:adapter") == 0  # an adapter's KV is its own
    assert cache.serve(words("s", 3), "m") == 0  # under a block: nothing cached or hit


def test_the_prefix_cache_keeps_its_capacity_least_recently_used_out():
    cache = PrefixCache(block_tokens=4, capacity=4)
    first, second = words("f", 8), words("g", 8)
    cache.serve(first, "m")
    cache.serve(second, "m")  # four blocks: full
    assert cache.serve(first, "m") == 8  # and first is the most recent now
    cache.serve(words("h", 8), "m")  # evicts second's two blocks, not first's
    assert len(cache.blocks) == 4
    assert cache.serve(first, "m") == 8
    assert cache.serve(second, "m") == 0
    assert PrefixCache(block_tokens=4, capacity=0).serve(first, "m") == 0


def test_prefill_takes_time_per_token_not_cached():
    server = SimServer("org/sim", SimSettings(block_tokens=4, prefill_ms_per_token=2.0))
    prompt = " ".join(words("p", 10))
    assert server._count_prefix(prompt, "m") == pytest.approx(0.020)  # ten tokens, none cached
    assert server._count_prefix(prompt, "m") == pytest.approx(0.004)  # eight cached, two not


async def test_time_to_first_token_counts_the_prefill_of_what_the_cache_lacks():
    server = SimServer("org/sim", SimSettings(block_tokens=4, prefill_ms_per_token=5.0,
                                              ttft_ms=0, tpot_ms=0))  # fmt: skip
    body = chat(messages=[{"role": "user", "content": " ".join(words("a", 8))}], max_tokens=1)
    async with TestClient(TestServer(server.app())) as client:
        for _ in range(2):  # 8 uncached tokens (40 ms), then none
            assert (await client.post("/v1/chat/completions", json=body)).status == 200
        stats = parse_engine_metrics(await (await client.get("/metrics")).text())
    counts = dict(stats.ttft_buckets)
    assert counts[float("inf")] == 2
    assert counts[0.0395] == 1  # only the second came in under its prefill's 40 ms
    assert stats.ttft_sum >= 0.040


def test_the_ttft_histogram_is_cumulative_in_vllms_format():
    histogram = TtftHistogram()
    for seconds in (0.0002, 0.0031, 0.2001, 3000.0):
        histogram.observe(seconds)
    lines = histogram.lines('model_name="m"')
    assert lines[0] == "# TYPE vllm:time_to_first_token_seconds histogram"
    stats = parse_engine_metrics("\n".join(lines) + "\n")
    counts = dict(stats.ttft_buckets)
    assert (counts[0.0005], counts[0.003], counts[0.0035], counts[0.25]) == (1, 1, 2, 3)
    assert counts[2560.0] == 3
    assert counts[float("inf")] == 4  # beyond the last bound: +Inf only
    assert stats.ttft_sum == pytest.approx(3000.2034)
    assert list(BUCKETS) == sorted(set(BUCKETS))


async def test_sleep_and_wake(sim):
    server, client = sim
    assert (await (await client.get("/is_sleeping")).json()) == {"is_sleeping": False}
    assert (await client.post("/sleep?level=1")).status == 200
    assert (await client.post("/v1/chat/completions", json=chat())).status == 503
    assert (await (await client.get("/is_sleeping")).json()) == {"is_sleeping": True}
    assert (await client.post("/wake_up")).status == 200
    assert not server.sleeping
    assert (await client.post("/v1/chat/completions", json=chat())).status == 200


def test_a_prompts_start_outlives_its_end_in_the_prefix_cache():
    # As vLLM frees a request's blocks tail first: a prompt partly evicted keeps its start.
    cache = PrefixCache(block_tokens=1, capacity=4)
    cache.serve(list("abc"), "m")
    cache.serve(list("de"), "m")  # five blocks for four: c, the end of abc, goes
    assert cache.serve(list("abc"), "m") == 2


async def test_render_says_the_tokens_its_prefix_cache_and_kv_events_use(sim):
    """vLLM's render endpoints, which vllm-router's kv_aware asks a prompt's tokens of: the
    same tokens the sim's prefix cache keys its blocks by (nodeagent.kvblocks.word_ids)."""
    server, client = sim
    answer = await client.post("/v1/chat/completions/render", json=chat())
    assert answer.status == 403  # as vLLM's, without --enable-scale-out
    server.enable_scale_out = True
    answer = await client.post("/v1/chat/completions/render", json=chat())
    assert await answer.json() == {"token_ids": word_ids("hello there")}
    body = {"model": "org/sim", "prompt": "one two three"}
    answer = await client.post("/v1/completions/render", json=body)
    assert await answer.json() == [{"token_ids": word_ids("one two three")}]  # as vLLM: a list
    answer = await client.post("/v1/completions/render", json={"model": "other", "prompt": "x"})
    assert answer.status == 404


def test_the_caches_keys_are_unsigned_as_vllms_are_on_the_wire():
    published = []

    class Publisher:
        def stored(self, keys, parent, tokens, size, lora):
            published.append((keys, parent))

        def removed(self, keys):
            published.append((keys, None))

    cache = PrefixCache(block_tokens=1, capacity=100, publisher=Publisher())
    for n in range(50):
        cache.serve([n, n + 1, n + 2], f"m{n}")
    keys = [key for stored, parent in published for key in [*stored, parent] if key is not None]
    assert all(0 <= key < 2**64 for key in keys)
