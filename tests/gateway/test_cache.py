from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import async_to_sync
from django.db import OperationalError

from controlplane import metrics
from controlplane.gateway import actions, cache
from controlplane.gateway.models import Usage
from controlplane.gateway.state import forget_cached
from controlplane.gateway.usage import UsageBuffer
from tests.factories import ModelFactory, make_api_key

pytestmark = pytest.mark.django_db


def test_keys_and_models_are_remembered_for_the_configured_seconds(client, settings):
    settings.GATEWAY_CACHE_SECONDS = 60
    ModelFactory(model_id="org/m")
    key, raw_key = make_api_key()
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw_key}"}
    assert client.get("/v1/models", **headers).status_code == 200
    actions.revoke_api_keys([key.pk])
    # Remembered: the documented delay before a revocation bites (at most the cache's seconds).
    assert client.get("/v1/models", **headers).status_code == 200
    forget_cached()
    assert client.get("/v1/models", **headers).status_code == 401


def test_the_allow_list_comes_with_the_remembered_key(settings):
    settings.GATEWAY_CACHE_SECONDS = 60
    allowed, other = ModelFactory(model_id="org/a"), ModelFactory(model_id="org/b")
    _, raw_key = make_api_key("scoped", ("org/a",))
    key = async_to_sync(cache.Cache().key_for_secret)(raw_key)
    assert key.may_use(allowed)
    assert not key.may_use(other)


def test_usage_is_written_in_batches(settings):
    settings.GATEWAY_USAGE_FLUSH_SECONDS = 0
    model = ModelFactory()
    key, _ = make_api_key()

    async def serve_three_requests() -> None:
        buffer = UsageBuffer()
        for prompt, completion in [(1, 2), (3, 4), (5, 6)]:
            buffer.add(key.pk, model.model_id, prompt, completion)
        assert buffer.flusher is not None
        await buffer.flusher

    async_to_sync(serve_three_requests)()
    usage = Usage.objects.get()
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (3, 9, 12)


class FlakyUsage(UsageBuffer):
    """A buffer whose database is away until `down` is cleared."""

    down = True

    async def write(self, key: tuple[int, str], counts: list[float]) -> None:
        if self.down:
            raise OperationalError("the database is away")
        await super().write(key, counts)


def test_usage_that_could_not_be_written_is_kept_for_the_next_flush(settings):
    settings.GATEWAY_USAGE_FLUSH_SECONDS = 3600  # flushed by hand below
    model = ModelFactory()
    key, _ = make_api_key()

    async def serve_while_the_database_blinks() -> None:
        buffer = FlakyUsage()
        buffer.add(key.pk, model.model_id, 1, 2)
        await buffer.flush()  # fails: kept
        buffer.add(key.pk, model.model_id, 3, 4)  # meanwhile
        assert buffer.pending == {(key.pk, model.model_id): [2, 4, 6]}
        buffer.down = False
        await buffer.flush()
        assert buffer.pending == {}
        assert buffer.flusher is not None
        buffer.flusher.cancel()

    async_to_sync(serve_while_the_database_blinks)()
    usage = Usage.objects.get()
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (2, 4, 6)


def test_past_the_backlog_the_oldest_unwritten_usage_is_dropped_and_counted(settings, caplog):
    settings.GATEWAY_USAGE_FLUSH_SECONDS = 3600
    settings.GATEWAY_USAGE_BACKLOG = 2
    dropped = metrics.USAGE_DROPPED.labels(UsageBuffer.what)
    before = dropped._value.get()

    async def fill() -> dict:
        buffer = FlakyUsage()
        for model_id in ("org/a", "org/b", "org/c"):
            buffer.add(7, model_id, 1, 1)
        await buffer.flush()
        assert buffer.flusher is not None
        buffer.flusher.cancel()
        return buffer.pending

    assert list(async_to_sync(fill)()) == [(7, "org/b"), (7, "org/c")]
    assert dropped._value.get() - before == 1
    assert "dropped 1 unwritten usage" in caplog.text


@pytest.mark.django_db(transaction=True)
def test_made_up_keys_cost_no_query_each_and_a_new_key_works_at_once(settings, monkeypatch):
    """A flood of well-formed keys nobody holds shares one look at the keys created since the
    last (KnownKeys), and one of the wrong shape asks nothing; a key created a moment ago is
    found by the look its request waits for."""
    import asyncio
    import secrets

    settings.GATEWAY_CACHE_SECONDS = 60
    forget_cached()
    _, real = make_api_key("real")
    looks = []
    look = cache.KnownKeys._look

    async def counted(self):
        looks.append(1)
        await look(self)

    monkeypatch.setattr(cache.KnownKeys, "_look", counted)

    lookups = cache.Cache()  # one loop's cache, as one web process has

    async def flood() -> list:
        made_up = [f"llmf-{secrets.token_urlsafe(32)}" for _ in range(500)]
        found = await asyncio.gather(*(lookups.key_for_secret(key) for key in made_up))
        found += [
            await lookups.key_for_secret("llmf-short"),
            await lookups.key_for_secret("x" * 48),
        ]
        return found

    assert async_to_sync(flood)() == [None] * 502
    assert len(looks) <= 2  # the first whole read, and at most one more
    assert async_to_sync(cache.Cache().key_for_secret)(real) is not None
    _, brand_new = make_api_key("created just now")
    assert async_to_sync(cache.Cache().key_for_secret)(brand_new) is not None
    from django.db import connection

    connection.close()


def test_a_run_of_one_off_lookups_evicts_the_oldest_never_the_whole_cache(settings, monkeypatch):
    settings.GATEWAY_CACHE_SECONDS = 60
    monkeypatch.setattr(cache, "_MAX_ENTRIES", 50)

    lookups = cache.Cache()

    async def fill() -> None:
        async def value() -> str:
            return "v"

        await lookups._remember("model", "org/everyday", value)
        for n in range(49):
            await lookups._remember("key", f"one-off-{n}", value)
        await lookups._remember("model", "org/everyday", value)  # used again: the newest
        for n in range(49, 90):
            await lookups._remember("key", f"one-off-{n}", value)
        await lookups._remember("model", "org/everyday", value)
        for n in range(90, 100):
            await lookups._remember("key", f"one-off-{n}", value)

    async_to_sync(fill)()
    assert len(cache.MEMORY.entries) == 50
    assert ("key", "one-off-0") not in cache.MEMORY.entries
    assert ("key", "one-off-99") in cache.MEMORY.entries
    assert ("model", "org/everyday") in cache.MEMORY.entries  # in use: not evicted by one-offs


@pytest.mark.django_db(transaction=True)
def test_a_key_committed_below_the_highest_id_seen_is_still_found(settings):
    """Ids are drawn at insert and commits land in any order: a key whose transaction ran
    long commits with an id under one already seen, and must not be refused for it."""
    settings.GATEWAY_CACHE_SECONDS = 60
    forget_cached()
    late, late_raw = make_api_key("committed late")
    _, early_raw = make_api_key("committed first")
    from controlplane.gateway.models import ApiKey, hash_key

    ApiKey.objects.filter(pk=late.pk).update(key_hash="0" * 64)  # not there yet, as it were
    assert async_to_sync(cache.Cache().key_for_secret)(early_raw) is not None  # the highest id seen
    ApiKey.objects.filter(pk=late.pk).update(key_hash=hash_key(late_raw))  # its commit lands
    assert async_to_sync(cache.Cache().key_for_secret)(late_raw) is not None
    from django.db import connection

    connection.close()


def test_requests_that_find_an_entry_missing_share_one_lookup(settings):
    settings.GATEWAY_CACHE_SECONDS = 60
    lookups = cache.Cache(cache.Memory())
    asked = []

    async def slow() -> str:
        asked.append(1)
        await asyncio.sleep(0.05)
        return "v"

    async def many() -> list[str]:
        return await asyncio.gather(*(lookups._remember("model", "org/m", slow) for _ in range(8)))

    assert async_to_sync(many)() == ["v"] * 8
    assert len(asked) == 1


def test_an_entry_past_its_ttl_is_served_while_one_lookup_replaces_it(settings, monkeypatch):
    """The request that finds a key or model stale does not wait for the database (it may be
    queued behind a write); past twice the TTL it does."""
    settings.GATEWAY_CACHE_SECONDS = 10
    clock = [1000.0]
    monkeypatch.setattr(cache, "clock", lambda: clock[0])
    lookups = cache.Cache(cache.Memory())
    values = iter(["old", "new", "newest"])
    release = asyncio.Event()

    async def load() -> str:
        value = next(values)
        if value == "new":
            await release.wait()  # the refresh is slow: the database is busy
        return value

    async def scenario() -> list[str]:
        seen = [await lookups._remember("key", "k", load)]
        clock[0] += 15  # past the TTL, within twice it
        seen.append(await lookups._remember("key", "k", load))  # at once: the value in memory
        seen.append(await lookups._remember("key", "k", load))  # one refresh under way, not two
        release.set()
        await asyncio.sleep(0.01)
        seen.append(await lookups._remember("key", "k", load))  # the refreshed value
        clock[0] += 25  # past twice the TTL: waited for
        seen.append(await lookups._remember("key", "k", load))
        return seen

    assert async_to_sync(scenario)() == ["old", "old", "old", "new", "newest"]
