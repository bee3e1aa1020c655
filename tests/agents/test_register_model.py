from __future__ import annotations

import io
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from agents.models import Model
from nodeagent import tinymodel
from nodeagent.store import Manifest
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


def test_register_from_s3_and_gcs(moto, gcs, tmp_path, monkeypatch):
    checkpoint = tinymodel.build(tmp_path / "checkpoint")
    for server, uri in ((moto, "s3://models/catalog/tiny"), (gcs, "gs://models/catalog/tiny")):
        publish(checkpoint, uri, server.environ(), stream=io.StringIO())
        for name, value in server.environ().items():
            monkeypatch.setenv(name, value)
        register(f"catalog/{uri[:2]}", uri)
        assert Model.objects.get(model_id=f"catalog/{uri[:2]}").size_bytes > 1_000_000


def test_a_model_in_two_stores_registers_with_its_mirror_and_labels(
    moto, gcs, tmp_path, monkeypatch
):
    checkpoint = tinymodel.build(tmp_path / "checkpoint")
    publish(checkpoint, "s3://models/two/tiny", moto.environ(), stream=io.StringIO())
    publish(checkpoint, "gs://models/two/tiny", gcs.environ(), stream=io.StringIO())
    for name, value in {**moto.environ(), **gcs.environ()}.items():
        monkeypatch.setenv(name, value)
    output = register(
        "two/tiny", "s3://models/two/tiny#cloud=aws,region=us-east-1",
        "gs://models/two/tiny#cloud=gcp",
    )  # fmt: skip
    model = Model.objects.get()
    assert model.source == "s3://models/two/tiny"
    assert model.source_labels == {"cloud": "aws", "region": "us-east-1"}
    assert model.mirrors == [{"uri": "gs://models/two/tiny", "labels": {"cloud": "gcp"}}]
    assert [s.uri for s in model.sources] == ["s3://models/two/tiny", "gs://models/two/tiny"]
    assert model.manifest == Manifest.of_directory(checkpoint).identity
    assert "(and 1 mirror(s))" in output


def test_a_mirror_whose_manifest_differs_is_refused_and_nothing_is_registered(published, tmp_path):
    other = (tmp_path / "store" / "other").as_uri()
    changed = tinymodel.build(tmp_path / "changed")
    (changed / "config.json").write_text((changed / "config.json").read_text() + " ")
    publish(changed, other, {}, stream=io.StringIO())
    with pytest.raises(CommandError) as raised:
        register("org/tiny", published, other)
    assert f"{other} holds another model than {published}" in str(raised.value)
    assert "config.json" in str(raised.value)
    assert not Model.objects.exists()


def test_a_mirror_that_cannot_be_read_is_named_and_nothing_is_registered(
    published, moto, tmp_path, monkeypatch
):
    for name, value in moto.environ().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(CommandError, match=r"s3://no-such-bucket/tiny: .*bucket_not_found"):
        register("org/tiny", published, "s3://no-such-bucket/tiny")
    missing = (tmp_path / "nowhere").as_uri()
    with pytest.raises(CommandError, match=f"{missing}: .*model_not_found"):
        register("org/tiny", published, missing)
    with pytest.raises(CommandError, match=r"hdfs://x/y: .*bad_uri"):
        register("org/tiny", published, "hdfs://x/y")
    with pytest.raises(CommandError, match="named twice"):
        register("org/tiny", published, published)
    with pytest.raises(CommandError, match="key=value"):
        register("org/tiny", f"{published}#cloud")
    assert not Model.objects.exists()
