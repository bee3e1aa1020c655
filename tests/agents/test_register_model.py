from __future__ import annotations

import io
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from agents.models import Model
from nodeagent import tinymodel
from nodeagent.store.publish import publish
from tests.factories import ModelFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def published(tmp_path) -> str:
    uri = (tmp_path / "store" / "tiny").as_uri()
    publish(tinymodel.build(tmp_path / "checkpoint"), uri, {}, stream=io.StringIO())
    return uri


def register(*args: str) -> str:
    out = StringIO()
    call_command("register_model", *args, stdout=out)
    return out.getvalue()


def test_registers_a_published_model_with_its_size_from_the_manifest(published, tmp_path):
    output = register(
        "org/tiny", published, "--engine-args", "--max-model-len 512 --dtype float32",
        "--keep-alive", "15m", "--max-replicas", "2", "--gpu-memory-gb", "0.5",
    )  # fmt: skip
    model = Model.objects.get(model_id="org/tiny")
    checkpoint_size = sum(p.stat().st_size for p in (tmp_path / "checkpoint").iterdir())
    assert model.size_bytes == checkpoint_size
    assert model.engine_args == ["--max-model-len", "512", "--dtype", "float32"]
    assert (model.keep_alive, model.max_replicas, model.gpu_memory_bytes) == (
        timedelta(minutes=15),
        2,
        500_000_000,
    )
    assert model.source == published
    assert model.kind == "generate"
    register("org/tiny-embed", published, "--kind", "embedding")
    assert Model.objects.get(model_id="org/tiny-embed").kind == "embedding"
    assert output.startswith("Registered org/tiny")
    assert "6 files, 1.9 MB" in output


def test_registering_again_updates_and_keeps_unset_options(published):
    register("org/tiny", published, "--keep-alive", "1h", "--pinned")
    output = register("org/tiny", published, "--revision", "v2")
    model = Model.objects.get()
    assert (model.revision, model.keep_alive, model.pinned) == ("v2", timedelta(hours=1), True)
    assert output.startswith("Updated org/tiny")


def test_a_source_without_a_published_model_is_refused(tmp_path):
    with pytest.raises(CommandError, match="model_not_found"):
        register("org/none", (tmp_path / "nothing").as_uri())
    assert not Model.objects.exists()


def test_an_azure_source_without_credentials_says_what_to_set(monkeypatch):
    monkeypatch.delenv("AZURE_STORAGE_CONNECTION_STRING", raising=False)
    monkeypatch.delenv("AZURE_STORAGE_ACCOUNT_URL", raising=False)
    with pytest.raises(CommandError, match="AZURE_STORAGE_CONNECTION_STRING"):
        register("org/m", "azure://models/org/m")


def test_invalid_options_write_nothing(published):
    ModelFactory(model_id="other")
    with pytest.raises(CommandError, match="max_replicas"):
        register("org/tiny", published, "--min-replicas", "3", "--max-replicas", "2")
    with pytest.raises(CommandError, match="model_id"):
        register("has space", published)
    with pytest.raises(CommandError, match="not a duration"):
        register("org/tiny", published, "--keep-alive", "soon")
    assert list(Model.objects.values_list("model_id", flat=True)) == ["other"]


def test_register_from_azurite(azurite, tmp_path, monkeypatch):
    uri = "azure://models/catalog/tiny"
    publish(tinymodel.build(tmp_path / "checkpoint"), uri, azurite.environ(), stream=io.StringIO())
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", azurite.connection_string())
    register("catalog/tiny", uri)
    assert Model.objects.get().size_bytes > 1_000_000
