"""The downloader and publisher against real S3 (moto) and GCS (gcp-storage-emulator)
servers, started, killed and restarted by the tests: the same behaviour as Azure's
(tests/store/test_azure_download.py) through the same store interface."""

from __future__ import annotations

import asyncio
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from nodeagent.download import JOURNAL, DownloadProgress, DownloadSettings
from nodeagent.store import StoreError
from nodeagent.store.publish import publish
from tests.clouds import BUCKET, Emulator, GcsEmulator, Moto
from tests.store.conftest import MIB, digests, fetch, quiet_publish, when_progress

SLOW = DownloadSettings(concurrency=2, range_bytes=1 * MIB, bandwidth_limit=20e6)


@dataclass
class Cloud:
    """One emulated store as the tests use it."""

    scheme: str
    server: Any

    def uri(self, name: str) -> str:
        return f"{self.scheme}://{BUCKET}/{name}"

    def environ(self) -> dict[str, str]:
        return dict(self.server.environ())


@pytest.fixture(params=["s3", "gs"])
def cloud(request: pytest.FixtureRequest) -> Cloud:
    server = request.getfixturevalue("moto" if request.param == "s3" else "gcs")
    return Cloud(request.param, server)


def total_bytes(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


async def test_publish_then_download_gives_the_same_bytes(cloud, checkpoint, tmp_path):
    quiet_publish(checkpoint, cloud.uri("org/synthetic"), cloud.environ())
    result = await fetch(cloud.uri("org/synthetic"), cloud.environ(), tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)
    assert result.fetched_bytes == total_bytes(checkpoint)
    assert result.resumed_bytes == 0
    assert not (tmp_path / "staging" / JOURNAL).exists()


async def test_publishing_twice_is_safe(cloud, checkpoint, tmp_path):
    quiet_publish(checkpoint, cloud.uri("twice"), cloud.environ())
    quiet_publish(checkpoint, cloud.uri("twice"), cloud.environ())
    await fetch(cloud.uri("twice"), cloud.environ(), tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)


async def test_a_prefix_without_manifest_is_not_a_model(cloud, tmp_path):
    cloud.server.overwrite("partial/config.json", b"{}")
    with pytest.raises(StoreError) as raised:
        await fetch(cloud.uri("partial"), cloud.environ(), tmp_path / "staging")
    assert (raised.value.code, raised.value.status) == ("model_not_found", 404)
    assert f"{cloud.uri('partial')} holds no published model" in str(raised.value)


async def test_a_bucket_that_does_not_exist_is_named_and_nothing_is_published(
    cloud, checkpoint, tmp_path
):
    uri = f"{cloud.scheme}://no-such-bucket/model"
    with pytest.raises(StoreError) as raised:
        await fetch(uri, cloud.environ(), tmp_path / "staging")
    assert (raised.value.code, raised.value.status) == ("bucket_not_found", 404)
    assert uri in str(raised.value)
    with pytest.raises(StoreError) as raised:
        quiet_publish(checkpoint, uri, cloud.environ())
    assert raised.value.code == "bucket_not_found"
    assert "does not exist" in str(raised.value)


async def test_a_corrupted_file_fails_the_checksum_and_leaves_nothing(cloud, checkpoint, tmp_path):
    quiet_publish(checkpoint, cloud.uri("corrupt"), cloud.environ())
    size = (checkpoint / "model-00001-of-00002.safetensors").stat().st_size
    cloud.server.overwrite("corrupt/model-00001-of-00002.safetensors", os.urandom(size))
    with pytest.raises(StoreError) as raised:
        await fetch(cloud.uri("corrupt"), cloud.environ(), tmp_path / "staging")
    assert raised.value.code == "checksum_mismatch"
    assert "model-00001-of-00002.safetensors" in str(raised.value)
    assert not (tmp_path / "staging").exists()


async def test_a_file_rewritten_mid_download_fails_it_and_leaves_nothing(
    cloud, checkpoint, tmp_path
):
    quiet_publish(checkpoint, cloud.uri("changing"), cloud.environ())
    progress = DownloadProgress()
    task = asyncio.create_task(
        fetch(cloud.uri("changing"), cloud.environ(), tmp_path / "staging", SLOW, progress)
    )
    await when_progress(progress, 0.2)
    name = "sub/model-00002-of-00002.safetensors"
    size = (checkpoint / name).stat().st_size
    await asyncio.to_thread(cloud.server.overwrite, f"changing/{name}", os.urandom(size))
    with pytest.raises(StoreError) as raised:
        await task
    # S3 answers the pinned read (If-Match) with 412. The GCS emulator ignores the pinned
    # generation GCS itself honours, and serves the new bytes: the digest catches them.
    expected = "blob_changed" if cloud.scheme == "s3" else "checksum_mismatch"
    assert raised.value.code == expected
    assert not (tmp_path / "staging").exists()


async def test_a_wrong_s3_secret_gets_a_clear_error(moto, checkpoint, tmp_path):
    quiet_publish(checkpoint, "s3://models/keyed", moto.environ())
    wrong = moto.environ(secret="not-the-secret")
    with pytest.raises(StoreError) as raised:
        await fetch("s3://models/keyed", wrong, tmp_path / "staging")
    assert (raised.value.code, raised.value.status) == ("access_denied", 403)
    assert "s3://models/keyed" in str(raised.value)
    assert "SignatureDoesNotMatch" in str(raised.value)
    assert "not-the-secret" not in str(raised.value)
    with pytest.raises(StoreError) as raised:
        quiet_publish(checkpoint, "s3://models/keyed", wrong)
    assert raised.value.code == "access_denied"


def service_account_file(path: Path, token_uri: str) -> Path:
    """A service-account key file whose token endpoint refuses it, as Google's does a key
    that was deleted or never granted."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path.write_text(
        json.dumps(
            {
                "type": "service_account", "project_id": "llmfleet-tests",
                "private_key_id": "0123", "private_key": pem,
                "client_email": "loader@llmfleet-tests.iam.gserviceaccount.com",
                "client_id": "1", "token_uri": token_uri,
            }
        )
    )  # fmt: skip
    return path


async def test_a_refused_gcs_service_account_gets_a_clear_error(gcs, checkpoint, tmp_path):
    quiet_publish(checkpoint, "gs://models/keyed", gcs.environ())
    key = service_account_file(tmp_path / "key.json", f"{gcs.url}/token")
    wrong = gcs.environ() | {"GOOGLE_APPLICATION_CREDENTIALS": str(key)}
    with pytest.raises(StoreError) as raised:
        await fetch("gs://models/keyed", wrong, tmp_path / "staging")
    assert (raised.value.code, raised.value.status) == ("access_denied", 403)
    assert "could not get an access token" in str(raised.value)
    assert "PRIVATE KEY" not in str(raised.value)
    with pytest.raises(StoreError) as raised:
        quiet_publish(checkpoint, "gs://models/other", wrong)
    assert raised.value.code == "access_denied"


async def test_an_unreadable_gcs_credentials_file_is_named(gcs, tmp_path):
    (tmp_path / "key.json").write_text("{not json")
    environ = gcs.environ() | {"GOOGLE_APPLICATION_CREDENTIALS": str(tmp_path / "key.json")}
    with pytest.raises(StoreError) as raised:
        await fetch("gs://models/anything", environ, tmp_path / "staging")
    assert (raised.value.code, raised.value.status) == ("no_credentials", 400)
    assert "key.json" in str(raised.value)


@pytest.fixture(params=["s3", "gs"])
def restartable(request: pytest.FixtureRequest, tmp_path: Path):
    """An emulator of this test's own, to kill and start again. GCS keeps its objects on
    disk; moto keeps them in memory, so after a restart the test publishes the same bytes
    again, and S3's ETags (MD5s of the content and its parts) come back the same."""
    if request.param == "s3":
        server: Emulator = Moto(tmp_path / "moto", auth=False)
    else:
        server = GcsEmulator(tmp_path / "gcs", data_dir=tmp_path / "gcs-data")
    yield Cloud(request.param, server.start())
    server.kill()


async def test_an_emulator_killed_mid_download_and_restarted_resumes_only_the_missing_ranges(
    restartable, checkpoint, tmp_path
):
    uri, environ = restartable.uri("outage"), restartable.environ()
    quiet_publish(checkpoint, uri, environ)
    staging, progress = tmp_path / "staging", DownloadProgress()
    task = asyncio.create_task(fetch(uri, environ, staging, SLOW, progress, deadline_seconds=4))
    await when_progress(progress, 0.5)
    restartable.server.kill()
    with pytest.raises(StoreError) as raised:
        await task
    assert raised.value.code == "store_unreachable"
    assert (staging / JOURNAL).exists()  # kept, to resume from

    restartable.server.start()
    if restartable.scheme == "s3":
        publish(checkpoint, uri, environ, stream=io.StringIO())
    result = await fetch(uri, environ, staging)
    total = total_bytes(checkpoint)
    assert result.resumed_bytes >= 0.4 * total  # all but the two 1 MiB ranges in flight
    assert result.fetched_bytes == total - result.resumed_bytes
    assert digests(staging) == digests(checkpoint)
