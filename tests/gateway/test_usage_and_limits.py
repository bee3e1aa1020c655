from __future__ import annotations

import json

import pytest
import redis
from asgiref.sync import async_to_sync, sync_to_async

from controlplane import metrics
from controlplane.gateway import limits
from controlplane.gateway.actions import record_usage
from controlplane.gateway.models import Usage
from controlplane.gateway.upstream import Meter, UsageScanner, ask_for_usage
from controlplane.gateway.validation import estimate_prompt_tokens
from tests.factories import ModelFactory, make_api_key

CHUNK = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
USAGE = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 5}}\n\n'
DONE = b"data: [DONE]\n\n"


@pytest.mark.parametrize("split", [1, 7, 40, 1000])
def test_the_scanner_finds_usage_across_chunk_boundaries_and_removes_it_when_asked(split):
    stream = CHUNK + CHUNK + USAGE + DONE
    pieces = [stream[i : i + split] for i in range(0, len(stream), split)]
    heard: list[dict] = []
    kept_scanner = UsageScanner(False, Meter(heard.append, 1))
    stripped_scanner = UsageScanner(True, Meter(heard.append, 1))
    kept = b"".join(kept_scanner.feed(piece) for piece in pieces) + kept_scanner.rest()
    stripped = b"".join(stripped_scanner.feed(piece) for piece in pieces) + stripped_scanner.rest()
    assert kept == stream  # the client asked for usage: its bytes unchanged
    assert stripped == CHUNK + CHUNK + DONE  # the gateway asked: the client never sees it
    kept_scanner.meter.settle()
    stripped_scanner.meter.settle()
    assert heard == [{"prompt_tokens": 3, "completion_tokens": 5}] * 2


def test_a_stream_that_ends_without_usage_is_charged_what_was_relayed():
    heard: list[dict] = []
    meter = Meter(heard.append, prompt_estimate=7)
    scanner = UsageScanner(True, meter)
    scanner.feed(CHUNK + CHUNK + CHUNK[:10])  # the client leaves mid-event
    meter.settle()
    meter.settle()  # said once, however many ways the end is seen
    assert heard == [{"prompt_tokens": 7, "completion_tokens": 2}]


# OpenAI's own streams say `"usage": null` in every chunk once usage is asked for.
NULL_USAGE = b'data: {"choices": [{"index": 0, "delta": {"content": "x"}}], "usage": null}\n\n'
# A model's text that speaks of usage: escaped inside the JSON, never a member.
QUOTED = b'data: {"choices": [{"index": 0, "delta": {"content": "\\"usage\\": 1"}}]}\n\n'
ERROR = b'data: {"error": {"message": "boom"}}\n\n'


@pytest.mark.parametrize("strip", [False, True])
def test_chunks_of_whole_events_without_usage_pass_as_the_same_bytes(strip):
    """The fast path: a chunk of whole events that reports no usage is relayed as it is (the
    same object: nothing split or joined), and its output events are still counted."""
    meter = Meter(lambda usage: None, 1)
    scanner = UsageScanner(strip, meter)
    chunks = [CHUNK, NULL_USAGE, QUOTED, CHUNK + NULL_USAGE + QUOTED]
    for chunk in chunks:
        assert scanner.feed(chunk) is chunk
    assert meter.relayed_events == 6
    assert meter.usage is None


@pytest.mark.parametrize("split", [1, 5, 33, 10_000])
def test_counted_outputs_are_the_same_whichever_way_the_stream_is_cut(split):
    stream = CHUNK + NULL_USAGE + ERROR + QUOTED + CHUNK + DONE
    pieces = [stream[i : i + split] for i in range(0, len(stream), split)]
    meter = Meter(lambda usage: None, 1)
    scanner = UsageScanner(True, meter)
    relayed = b"".join(scanner.feed(piece) for piece in pieces) + scanner.rest()
    assert relayed == stream
    assert meter.relayed_events == 4  # the error event and [DONE] are no output


def test_the_usage_after_null_usage_chunks_is_found_and_removed():
    heard: list[dict] = []
    scanner = UsageScanner(True, Meter(heard.append, 1))
    relayed = b"".join(scanner.feed(chunk) for chunk in (NULL_USAGE, NULL_USAGE, USAGE, DONE))
    assert relayed == NULL_USAGE + NULL_USAGE + DONE
    scanner.meter.settle()
    assert heard == [{"prompt_tokens": 3, "completion_tokens": 5}]


def test_the_prompt_estimate_reads_the_text_of_messages_and_prompts():
    chat = {"messages": [{"role": "user", "content": "x" * 400}]}
    assert estimate_prompt_tokens(chat) == 100
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "y" * 40}]}]}
    assert estimate_prompt_tokens(parts) == 10
    assert estimate_prompt_tokens({"prompt": [1, 2, 3]}) == 3
    assert estimate_prompt_tokens({"prompt": ""}) == 1


def test_usage_is_asked_for_only_when_the_client_did_not():
    raw, added = ask_for_usage(b'{"model": "m", "stream": true}', {"model": "m", "stream": True})
    assert added
    assert json.loads(raw)["stream_options"] == {"include_usage": True}
    own = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
    assert ask_for_usage(own, json.loads(own)) == (own, False)


@pytest.mark.django_db
def test_usage_accumulates_per_key_model_and_day():
    model = ModelFactory()
    key, _ = make_api_key()
    for prompt, completion in [(3, 5), (10, 20)]:
        async_to_sync(record_usage)(key.pk, model.model_id, prompt, completion)
    usage = Usage.objects.get()
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (2, 13, 25)
    key.refresh_from_db()
    assert key.last_used_at is not None


@pytest.mark.django_db(transaction=True)
async def test_a_batch_whose_write_fails_after_its_usage_row_is_counted_once(monkeypatch):
    """The key's last_used_at is written after its usage: should that fail, the batch is kept
    and written again whole, so the usage row's addition must not have stayed behind."""
    from django.db import DatabaseError, connection

    from controlplane.gateway.models import ApiKey
    from controlplane.gateway.usage import UsageBuffer

    model = await sync_to_async(ModelFactory)()
    key, _ = await sync_to_async(make_api_key)()
    filter_keys, failures = ApiKey.objects.filter, [DatabaseError("connection lost")]

    class Flaky:
        def __init__(self, *args, **kwargs):
            self.rows = filter_keys(*args, **kwargs)

        def update(self, **values):
            if failures:
                raise failures.pop()
            return self.rows.update(**values)

    monkeypatch.setattr(ApiKey.objects, "filter", Flaky)
    usage = UsageBuffer()
    usage.add(key.pk, model.model_id, 3, 5)
    await usage.flush()  # fails at last_used_at: kept for the next flush
    assert usage.pending
    await usage.flush()
    row = await Usage.objects.aget()
    assert (row.requests, row.prompt_tokens, row.completion_tokens) == (1, 3, 5)
    if usage.flusher is not None:
        usage.flusher.cancel()
    await sync_to_async(
        lambda: connection.close()
    )()  # the ORM thread's: not left for teardown to meet


@pytest.fixture(params=["redis", "in-process"])
def limiter(request, settings):
    if request.param == "in-process":
        settings.REDIS_URL = ""
    else:
        # The tests' own Redis database: counters of an earlier run must not count here.
        redis.Redis.from_url(settings.REDIS_URL).flushdb()
    return request.param


@pytest.mark.django_db
def test_requests_per_minute_refuse_then_recover_in_the_next_window(limiter):
    key, _ = make_api_key("rpm", requests_per_minute=2)
    start = 1_800_000_000.0 + key.pk * 600  # a window of this key alone

    def admit(key, now):  # each call on a loop of its own, with that loop's limiter
        return async_to_sync(limits.Limiter().admit)(key, 10, now=now)

    assert admit(key, start) is None
    assert admit(key, start + 1) is None
    refused = admit(key, start + 2)
    assert refused is not None
    assert 1 <= refused.retry_after <= 60
    assert "2 requests per minute" in refused.message
    assert admit(key, start + 60) is None  # the next minute


@pytest.mark.django_db
def test_tokens_per_minute_count_what_the_engines_reported(limiter):
    key, _ = make_api_key("tpm", tokens_per_minute=100)
    start = 1_900_000_000.0 + key.pk * 600

    async def scenario() -> None:  # one loop, one limiter: its Redis client is the loop's
        limiter = limits.Limiter()
        reservation = await limiter.admit(key, 30, now=start)
        assert isinstance(reservation, limits.Reservation)
        await reservation.settle(100)  # it used more than it reserved: the engine said so
        refused = await limiter.admit(key, 1, now=start + 1)
        assert isinstance(refused, limits.Refusal)
        assert "100 tokens per minute" in refused.message
        assert isinstance(await limiter.admit(key, 1, now=start + 60), limits.Reservation)
        await limiter.close()

    async_to_sync(scenario)()


@pytest.mark.django_db
def test_tokens_per_minute_hold_while_requests_run_at_once(limiter):
    """Each admitted request reserves its prompt and max_tokens: a window no longer admits
    any number of requests that are all still running (none has reported usage yet)."""
    key, _ = make_api_key("tpm-concurrent", tokens_per_minute=100)
    start = 1_950_000_000.0 + key.pk * 600

    async def scenario() -> None:
        limiter = limits.Limiter()

        async def admit(reserve, now=start):
            return await limiter.admit(key, reserve, now=now)

        first, second = await admit(40), await admit(40)
        refused = await admit(40)  # 120 reserved would pass the limit
        assert isinstance(refused, limits.Refusal)
        assert "reserves 40" in refused.message
        await first.settle(5)  # it finished short: the rest of its reservation comes back
        assert isinstance(await admit(40), limits.Reservation)
        await second.settle(0)  # it reached no engine
        await second.settle(50)  # settled once only
        assert isinstance(await admit(40), limits.Reservation)
        # A request larger than the whole limit runs, once a window (the window held nothing).
        assert isinstance(await admit(500, start + 60), limits.Reservation)
        assert isinstance(await admit(1, start + 61), limits.Refusal)
        await limiter.close()

    async_to_sync(scenario)()


@pytest.mark.django_db
def test_keys_without_limits_touch_nothing(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # would fail if it were used
    key, _ = make_api_key("free")
    assert async_to_sync(limits.Limiter().admit)(key) is None


@pytest.mark.django_db
def test_limits_let_requests_in_when_redis_does_not_answer(settings, caplog):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    key, _ = make_api_key("limited", requests_per_minute=1, tokens_per_minute=10)
    before = metrics.RATE_LIMIT_UNAVAILABLE._value.get()
    for _ in range(3):  # over the limit, were it counted
        assert async_to_sync(limits.Limiter().admit)(key, 20) is None
    async_to_sync(limits.Limiter().add_tokens)(key, 50)
    assert metrics.RATE_LIMIT_UNAVAILABLE._value.get() - before == 4
    assert "rate limits not enforced: Redis did not answer" in caplog.text
