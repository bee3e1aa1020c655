from __future__ import annotations

import pytest
from asgiref.sync import async_to_sync

from controlplane.gateway import actions, cache
from controlplane.gateway.models import Usage
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
    cache.clear()
    assert client.get("/v1/models", **headers).status_code == 401


def test_the_allow_list_comes_with_the_remembered_key(settings):
    settings.GATEWAY_CACHE_SECONDS = 60
    allowed, other = ModelFactory(model_id="org/a"), ModelFactory(model_id="org/b")
    _, raw_key = make_api_key("scoped", ("org/a",))
    key = async_to_sync(cache.key_for_secret)(raw_key)
    assert key.may_use(allowed)
    assert not key.may_use(other)


def test_usage_is_written_in_batches(settings):
    settings.GATEWAY_USAGE_FLUSH_SECONDS = 0
    model = ModelFactory()
    key, _ = make_api_key()

    async def serve_three_requests() -> None:
        buffer = UsageBuffer()
        for prompt, completion in [(1, 2), (3, 4), (5, 6)]:
            buffer.add(key.pk, model.pk, prompt, completion)
        assert buffer.flusher is not None
        await buffer.flusher

    async_to_sync(serve_three_requests)()
    usage = Usage.objects.get()
    assert (usage.requests, usage.prompt_tokens, usage.completion_tokens) == (3, 9, 12)
