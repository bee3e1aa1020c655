from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from controlplane.gateway.models import ApiKey, hash_key
from tests.factories import ModelFactory

pytestmark = pytest.mark.django_db


def create(*args: str) -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("create_api_key", *args, stdout=out, stderr=err)
    return out.getvalue().strip(), err.getvalue()


def test_prints_the_key_once_and_stores_only_its_hash(client):
    raw_key, note = create("billing-app")

    key = ApiKey.objects.get()
    assert key.name == "billing-app"
    assert key.key_hash == hash_key(raw_key)
    assert raw_key not in {key.key_hash, key.prefix}
    assert raw_key.startswith(key.prefix)
    assert "cannot be shown again" in note
    assert client.get("/v1/models", HTTP_AUTHORIZATION=f"Bearer {raw_key}").status_code == 200


def test_models_limits_and_expiry(client):
    ModelFactory(model_id="org/a")
    ModelFactory(model_id="org/b")
    create(
        "scoped",
        "--models",
        "org/a, org/b",
        "--rpm",
        "60",
        "--tpm",
        "10000",
        "--expires-in-days",
        "30",
    )

    key = ApiKey.objects.get()
    assert sorted(key.allowed_models.values_list("model_id", flat=True)) == ["org/a", "org/b"]
    assert (key.requests_per_minute, key.tokens_per_minute) == (60, 10000)
    assert key.expires_at is not None


def test_unknown_models_are_named_and_nothing_is_created():
    ModelFactory(model_id="org/a")
    with pytest.raises(CommandError, match="org/missing"):
        create("scoped", "--models", "org/a,org/missing")
    assert not ApiKey.objects.exists()


def test_two_keys_never_share_a_secret():
    first, _ = create("one")
    second, _ = create("two")
    assert first != second
