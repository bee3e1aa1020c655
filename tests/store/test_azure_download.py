"""The downloader against a real Azurite, started and stopped by the tests."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from azure.storage.blob import BlobServiceClient, ContainerSasPermissions, generate_container_sas

from nodeagent.download import JOURNAL, DownloadProgress, DownloadSettings
from nodeagent.store import StoreError
from nodeagent.store.azure import AZURITE_ACCOUNT, AZURITE_KEY
from tests.azurite import Azurite
from tests.store.conftest import MIB, digests, fetch, quiet_publish, when_progress

SLOW = DownloadSettings(concurrency=2, range_bytes=1 * MIB, bandwidth_limit=20e6)


def blob_client(azurite: Azurite):
    return BlobServiceClient.from_connection_string(azurite.connection_string())


async def test_publish_then_download_gives_the_same_bytes(azurite, checkpoint, tmp_path):
    quiet_publish(checkpoint, "azure://models/org/synthetic", azurite.environ())
    result = await fetch("azure://models/org/synthetic", azurite.environ(), tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)
    assert result.fetched_bytes == sum(
        p.stat().st_size for p in checkpoint.rglob("*") if p.is_file()
    )
    assert result.resumed_bytes == 0
    assert not (tmp_path / "staging" / JOURNAL).exists()


async def test_publishing_twice_is_safe(azurite, checkpoint, tmp_path):
    quiet_publish(checkpoint, "azure://models/twice", azurite.environ())
    quiet_publish(checkpoint, "azure://models/twice", azurite.environ())
    await fetch("azure://models/twice", azurite.environ(), tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)


async def test_a_prefix_without_manifest_is_not_a_model(azurite, checkpoint, tmp_path):
    # What a publish interrupted before its last step leaves: files, no manifest.
    container = blob_client(azurite).get_container_client("models")
    container.upload_blob("partial/config.json", b"{}", overwrite=True)
    with pytest.raises(StoreError) as raised:
        await fetch("azure://models/partial", azurite.environ(), tmp_path / "staging")
    assert (raised.value.code, raised.value.status) == ("model_not_found", 404)
    assert "no llmfleet-manifest.json" in str(raised.value)


async def test_a_missing_model_says_so(azurite, tmp_path):
    with pytest.raises(StoreError) as raised:
        await fetch("azure://models/does/not/exist", azurite.environ(), tmp_path / "staging")
    assert raised.value.code == "model_not_found"


async def test_a_wrong_key_gets_a_clear_error(azurite, checkpoint, tmp_path):
    quiet_publish(checkpoint, "azure://models/keyed", azurite.environ())
    wrong = "d3Jvbmcta2V5LXdyb25nLWtleS13cm9uZy1rZXk="
    with pytest.raises(StoreError) as raised:
        await fetch("azure://models/keyed", azurite.environ(key=wrong), tmp_path / "staging")
    assert (raised.value.code, raised.value.status) == ("access_denied", 403)
    assert "denied" in str(raised.value)


async def test_a_read_only_sas_downloads_but_cannot_publish(azurite, checkpoint, tmp_path):
    quiet_publish(checkpoint, "azure://models/shared", azurite.environ())
    sas = generate_container_sas(
        AZURITE_ACCOUNT, "models", account_key=AZURITE_KEY,
        permission=ContainerSasPermissions(read=True, list=True), expiry=time.time() + 3600,
    )  # fmt: skip
    environ = {"AZURE_STORAGE_ACCOUNT_URL": azurite.account_url, "AZURE_STORAGE_SAS_TOKEN": sas}
    await fetch("azure://models/shared", environ, tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)
    with pytest.raises(StoreError) as raised:
        quiet_publish(checkpoint, "azure://models/shared", environ)
    assert raised.value.code == "access_denied"


async def test_a_corrupted_file_fails_the_checksum_and_leaves_nothing(
    azurite, checkpoint, tmp_path
):
    quiet_publish(checkpoint, "azure://models/corrupt", azurite.environ())
    size = (checkpoint / "model-00001-of-00002.safetensors").stat().st_size
    container = blob_client(azurite).get_container_client("models")
    container.upload_blob(
        "corrupt/model-00001-of-00002.safetensors", os.urandom(size), overwrite=True
    )
    with pytest.raises(StoreError) as raised:
        await fetch("azure://models/corrupt", azurite.environ(), tmp_path / "staging")
    assert raised.value.code == "checksum_mismatch"
    assert "model-00001-of-00002.safetensors" in str(raised.value)
    assert not (tmp_path / "staging").exists()


async def test_a_blob_changed_mid_download_is_detected(azurite, checkpoint, tmp_path):
    quiet_publish(checkpoint, "azure://models/changing", azurite.environ())
    progress = DownloadProgress()
    task = asyncio.create_task(
        fetch("azure://models/changing", azurite.environ(), tmp_path / "staging", SLOW, progress)
    )
    await when_progress(progress, 0.2)
    container = blob_client(azurite).get_container_client("models")
    size = (checkpoint / "sub" / "model-00002-of-00002.safetensors").stat().st_size
    await asyncio.to_thread(
        container.upload_blob,
        "changing/sub/model-00002-of-00002.safetensors",
        os.urandom(size),
        overwrite=True,
    )
    with pytest.raises(StoreError) as raised:
        await task
    assert raised.value.code == "blob_changed"
    assert not (tmp_path / "staging").exists()


async def test_an_outage_fails_within_the_deadline_and_the_next_try_fetches_only_what_is_missing(
    disk_azurite, checkpoint, tmp_path
):
    quiet_publish(checkpoint, "azure://models/outage", disk_azurite.environ())
    disk_azurite.wait_saved()
    staging = tmp_path / "staging"
    progress = DownloadProgress()
    started = time.monotonic()
    task = asyncio.create_task(
        fetch(
            "azure://models/outage",
            disk_azurite.environ(),
            staging,
            SLOW,
            progress,
            deadline_seconds=4,
        )
    )
    await when_progress(progress, 0.3)
    disk_azurite.kill()  # and never restarted during this attempt
    with pytest.raises(StoreError) as raised:
        await task
    assert time.monotonic() - started < 4 + 2
    assert raised.value.code == "store_unreachable"
    assert "deadline" in str(raised.value)
    assert (staging / JOURNAL).exists()  # kept, to resume from

    disk_azurite.start()
    result = await fetch("azure://models/outage", disk_azurite.environ(), staging)
    total = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    assert result.resumed_bytes >= 0.25 * total
    assert result.fetched_bytes == total - result.resumed_bytes
    assert digests(staging) == digests(checkpoint)


async def test_a_store_restarted_during_the_download_is_waited_for(
    disk_azurite, checkpoint, tmp_path
):
    quiet_publish(checkpoint, "azure://models/restart", disk_azurite.environ())
    disk_azurite.wait_saved()
    progress = DownloadProgress()
    task = asyncio.create_task(
        fetch(
            "azure://models/restart", disk_azurite.environ(), tmp_path / "staging", SLOW, progress
        )
    )
    await when_progress(progress, 0.3)
    disk_azurite.kill()
    await asyncio.sleep(1.0)
    await asyncio.to_thread(disk_azurite.start)
    result = await task
    assert result.retries > 0
    assert digests(tmp_path / "staging") == digests(checkpoint)
