"""`manage.py setup_demo`: the tiny model published, registered and a key kept, idempotently."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from agents.choices import ModelKind
from agents.models import Model
from controlplane.gateway.models import ApiKey

pytestmark = pytest.mark.django_db


def run(*args: str) -> str:
    out = io.StringIO()
    call_command("setup_demo", *args, stdout=out)
    return out.getvalue()


def test_setup_demo_publishes_to_azure_registers_and_keeps_one_key(
    azurite, monkeypatch, settings, tmp_path
):
    settings.VAR_DIR = tmp_path
    for name, value in azurite.environ().items():
        monkeypatch.setenv(name, value)
    key_file = tmp_path / "key"
    first = run("--store", "azure://models/llmfleet/tiny", "--key-file", str(key_file))
    assert "Publishing it to azure://models/llmfleet/tiny" in first
    model = Model.objects.get(model_id="llmfleet/tiny")
    assert model.source == "azure://models/llmfleet/tiny"
    assert model.size_bytes > 1_000_000
    assert "--kv-cache-memory-bytes" in model.engine_args  # no GPU here: vLLM's CPU flags
    embedder = Model.objects.get(model_id="llmfleet/tiny-embed")
    assert (embedder.kind, embedder.source) == (ModelKind.EMBEDDING, model.source)
    assert embedder.engine_argv[:2] == ("--runner", "pooling")
    adapter = Model.objects.get(model_id="llmfleet/tiny-lora")
    assert (adapter.base, adapter.adapter_rank) == (model, 8)
    assert adapter.source == "azure://models/llmfleet/tiny-lora"
    assert model.lora_argv == ("--enable-lora", "--max-loras", "4", "--max-lora-rank", "8")
    secret = key_file.read_text().strip()
    assert ApiKey.objects.for_secret(secret).exists()
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"

    again = run("--store", "azure://models/llmfleet/tiny", "--key-file", str(key_file))
    assert "Publishing" not in again
    assert "Kept llmfleet/tiny from" in again
    assert "Kept llmfleet/tiny-embed (embeddings)" in again
    assert "Kept llmfleet/tiny-lora (a LoRA adapter of llmfleet/tiny)" in again
    assert key_file.read_text().strip() == secret
    assert ApiKey.objects.count() == 1


def test_a_revoked_demo_key_is_replaced(settings, tmp_path):
    settings.VAR_DIR = tmp_path
    run()
    secret = (tmp_path / "demo-api-key").read_text().strip()
    assert (
        Model.objects.get(model_id="llmfleet/tiny").source
        == (tmp_path / "store" / "llmfleet" / "tiny").as_uri()
    )
    ApiKey.objects.update(revoked_at="2026-01-01T00:00:00Z")
    run()
    assert (tmp_path / "demo-api-key").read_text().strip() != secret
