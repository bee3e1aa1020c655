from __future__ import annotations

import argparse
import json

import aiohttp
import pytest

from nodeagent.cache import CacheEntry, plan_eviction
from nodeagent.store import Manifest, ManifestFile, StoreError, open_store, read_manifest
from nodeagent.store.azure import AZURITE_ACCOUNT, AzureCredentials, parse_azure_uri
from nodeagent.store.base import http_status_error
from nodeagent.store.gcs import GcsStore, parse_gcs_uri
from nodeagent.store.s3 import bucket_base, parse_s3_uri, s3_error_code
from nodeagent.values import parse_bytes as _bytes

GIB = 1024**3


def entry(model_id: str, size_gib: int, last_used: float, in_use: bool = False) -> CacheEntry:
    return CacheEntry(model_id, size_gib * GIB, last_used, in_use)


def test_eviction_takes_the_least_recently_used_unused_models_first():
    entries = [entry("old", 10, 1.0), entry("running", 10, 0.5, in_use=True), entry("new", 10, 9.0)]
    assert plan_eviction(entries, 15 * GIB, capacity=40 * GIB, disk_free=10**15) == ["old"]
    assert plan_eviction(entries, 25 * GIB, capacity=40 * GIB, disk_free=10**15) == ["old", "new"]
    assert plan_eviction(entries, 5 * GIB, capacity=40 * GIB, disk_free=10**15) == []


def test_eviction_never_takes_a_model_in_use_and_says_when_it_cannot_make_room():
    entries = [entry("running", 30, 0.0, in_use=True), entry("idle", 5, 1.0)]
    assert plan_eviction(entries, 20 * GIB, capacity=40 * GIB, disk_free=10**15) is None


def test_eviction_also_answers_to_the_disk_s_free_space():
    entries = [entry("a", 4, 1.0), entry("b", 4, 2.0)]
    assert plan_eviction(entries, 6 * GIB, capacity=None, disk_free=3 * GIB) == ["a"]
    assert plan_eviction(entries, 20 * GIB, capacity=None, disk_free=3 * GIB) is None


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("0", 0),
        ("512M", 512 * 1024**2),
        ("1.5G", int(1.5 * GIB)),
        ("2TiB", 2 * 1024**4),
        ("100", 100),
    ],
)
def test_cache_sizes(text, size):
    assert _bytes(text) == size


@pytest.mark.parametrize("text", ["lots", "-1G", "1X"])
def test_bad_cache_sizes(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _bytes(text)


def test_connection_strings():
    azurite = AzureCredentials.from_connection_string(
        "DefaultEndpointsProtocol=http;AccountName=devstoreaccount1;AccountKey=a2V5;"
        "BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    )
    assert (azurite.account_url, azurite.account_name, azurite.account_key) == (
        "http://127.0.0.1:10000/devstoreaccount1", "devstoreaccount1", "a2V5",
    )  # fmt: skip
    azure = AzureCredentials.from_connection_string(
        "DefaultEndpointsProtocol=https;AccountName=fleetmodels;AccountKey=a2V5;EndpointSuffix=core.windows.net"
    )
    assert azure.account_url == "https://fleetmodels.blob.core.windows.net"
    sas = AzureCredentials.from_connection_string(
        "BlobEndpoint=https://fleetmodels.blob.core.windows.net/;SharedAccessSignature=sv=2022&sig=abc"
    )
    assert (sas.account_name, sas.sas_for("models")) == ("fleetmodels", "sv=2022&sig=abc")
    development = AzureCredentials.from_connection_string("UseDevelopmentStorage=true")
    assert development.account_name == AZURITE_ACCOUNT


def test_account_url_with_a_key_signs_a_read_and_list_sas():
    credentials = AzureCredentials.from_environment(
        {
            "AZURE_STORAGE_ACCOUNT_URL": "http://127.0.0.1:10000/devstoreaccount1",
            "AZURE_STORAGE_KEY": "a2V5a2V5",
        }
    )
    sas = credentials.sas_for("models")
    assert credentials.account_name == "devstoreaccount1"
    assert "sp=rl" in sas
    assert "sig=" in sas


def test_missing_credentials_say_what_to_set():
    with pytest.raises(StoreError, match="AZURE_STORAGE_CONNECTION_STRING") as raised:
        AzureCredentials.from_environment({})
    assert raised.value.status == 400


@pytest.mark.parametrize("uri", ["azure://models", "azure:///prefix", "s3://models/x"])
def test_bad_azure_uris(uri):
    with pytest.raises(StoreError, match="azure://<container>/<prefix>"):
        parse_azure_uri(uri)


@pytest.mark.parametrize(
    ("parse", "uri", "form"),
    [
        (parse_s3_uri, "s3://bucket", "s3://<bucket>/<prefix>"),
        (parse_s3_uri, "gs://bucket/x", "s3://<bucket>/<prefix>"),
        (parse_gcs_uri, "gs:///prefix", "gs://<bucket>/<prefix>"),
    ],
)
def test_bad_bucket_uris(parse, uri, form):
    with pytest.raises(StoreError, match=form) as raised:
        parse(uri)
    assert (raised.value.code, raised.value.status) == ("bad_uri", 400)


async def test_an_unknown_scheme_names_every_scheme_there_is():
    async with aiohttp.ClientSession() as session:
        with pytest.raises(StoreError) as raised:
            open_store("hdfs://cluster/model", session, {})
    assert (raised.value.code, raised.value.status) == ("bad_uri", 400)
    for form in ("azure://<container>/<prefix>", "s3://<bucket>/<prefix>", "gs://<bucket>/"):
        assert form in str(raised.value)
    with pytest.raises(StoreError, match="hdfs://cluster/model"):
        read_manifest("hdfs://cluster/model", {})


def test_s3_without_any_credentials_says_where_they_come_from(tmp_path, monkeypatch):
    from nodeagent.store.s3 import S3Connection

    # botocore's chain reads the process's environment; the metadata service stays unasked.
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    connection = S3Connection({"AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"})
    with pytest.raises(StoreError, match="AWS_ACCESS_KEY_ID") as raised:
        connection.signed_headers("http://127.0.0.1:9/b/k", {}, "us-east-1")
    assert raised.value.code == "no_credentials"


def test_manifest_round_trip_and_paths_that_escape_are_refused():
    manifest = Manifest(
        (
            ManifestFile("config.json", 10, "ab" * 32),
            ManifestFile("w/model.safetensors", 5, "cd" * 32),
        )
    )
    assert Manifest.from_json(manifest.to_json()) == manifest
    assert manifest.total_size == 15
    for escaping in ("../../etc/passwd", "/etc/passwd", "a/./b", "a//b", ""):
        body = json.dumps({"files": [{"path": escaping, "size": 1, "sha256": "x"}]})
        with pytest.raises(StoreError) as raised:
            Manifest.from_json(body)
        assert raised.value.code == "bad_manifest"


@pytest.mark.parametrize(
    "path",
    [".llmfleet-compile/k/inductor.py", "sub/.llmfleet-journal", ".llmfleet.json",
     "llmfleet-manifest.json"],
)  # fmt: skip
def test_a_manifest_cannot_name_the_agent_s_own_files(path):
    body = json.dumps({"files": [{"path": path, "size": 1, "sha256": "x"}]})
    with pytest.raises(StoreError, match="the agent's own files") as raised:
        Manifest.from_json(body)
    assert raised.value.code == "bad_manifest"
    with pytest.raises(StoreError, match="cannot be read"):
        Manifest.from_json("{not json")


def test_missing_ranges_are_the_gaps_whatever_range_size_wrote_the_journal():
    from nodeagent.download_plan import missing_ranges
    from nodeagent.store import RemoteFile

    file = RemoteFile("w.safetensors", 100, "etag", None)
    done = {"w.safetensors": [(30, 40), (0, 10), (35, 50)]}  # unsorted, overlapping
    pieces = [(p.start, p.end) for p in missing_ranges([file], done, 16)]
    assert pieces == [(10, 26), (26, 30), (50, 66), (66, 82), (82, 98), (98, 100)]
    assert [(p.start, p.end) for p in missing_ranges([file], {}, 64)] == [(0, 64), (64, 100)]
    assert list(missing_ranges([file], {"w.safetensors": [(0, 100)]}, 16)) == []


@pytest.mark.parametrize(
    ("endpoint", "bucket", "base"),
    [
        (
            "https://s3.eu-west-1.amazonaws.com",
            "models",
            "https://models.s3.eu-west-1.amazonaws.com",
        ),
        (
            "https://s3.cn-north-1.amazonaws.com.cn",
            "m1",
            "https://m1.s3.cn-north-1.amazonaws.com.cn",
        ),
        (
            "https://s3.us-east-1.amazonaws.com",
            "my.models",
            "https://s3.us-east-1.amazonaws.com/my.models",
        ),
    ],
)
def test_s3_reads_go_to_the_buckets_own_regional_endpoint(endpoint, bucket, base):
    assert bucket_base(endpoint, bucket) == base


def test_s3_error_bodies_are_cut_to_their_code_and_message():
    body = (
        "<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated"
        " does not match</Message><AWSAccessKeyId>AKIAEXAMPLE</AWSAccessKeyId><StringToSign>"
        "AWS4-HMAC-SHA256 ...</StringToSign></Error>"
    )
    error = http_status_error(403, "model.safetensors", s3_error_code(body))
    assert error.code == "access_denied"
    assert "SignatureDoesNotMatch: The request signature" in str(error)
    assert "AKIAEXAMPLE" not in str(error)


async def test_gcs_reads_are_pinned_to_the_listed_generation():
    async with aiohttp.ClientSession() as session:
        store = GcsStore("gs://models/org/m", session, {"STORAGE_EMULATOR_HOST": "127.0.0.1:9"})
    url = store._media_url("sub dir/model+1.safetensors", "1700000000123")
    assert url == (
        "http://127.0.0.1:9/download/storage/v1/b/models/o/org%2Fm%2Fsub%20dir%2Fmodel%2B1"
        ".safetensors?alt=media&generation=1700000000123&ifGenerationMatch=1700000000123"
    )
