"""The same downloader with `file://` sources."""

from __future__ import annotations

import asyncio
import contextlib
import json

import pytest

from nodeagent.download import JOURNAL, DownloadProgress, DownloadSettings
from nodeagent.store import StoreError
from tests.store.conftest import MIB, digests, fetch, listing, quiet_publish, when_progress


async def test_a_published_directory_downloads_with_checksums(checkpoint, tmp_path):
    uri = (tmp_path / "store" / "org" / "model").as_uri()
    quiet_publish(checkpoint, uri, {})
    await fetch(uri, {}, tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)


async def test_a_plain_checkpoint_directory_downloads_too(checkpoint, tmp_path):
    await fetch(checkpoint.as_uri(), {}, tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)


async def test_an_interrupted_download_resumes_with_only_the_missing_ranges(checkpoint, tmp_path):
    staging = tmp_path / "staging"
    progress = DownloadProgress()
    slow = DownloadSettings(concurrency=1, range_bytes=1 * MIB, bandwidth_limit=40e6)
    task = asyncio.create_task(fetch(checkpoint.as_uri(), {}, staging, slow, progress))
    await when_progress(progress, 0.5)
    task.cancel()  # as an agent that stops mid-download
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert (staging / JOURNAL).exists()

    result = await fetch(checkpoint.as_uri(), {}, staging)
    assert result.resumed_bytes >= 0.4 * progress.total
    assert result.fetched_bytes + result.resumed_bytes == progress.total
    assert digests(staging) == digests(checkpoint)


async def test_a_journal_of_another_version_is_ignored(checkpoint, tmp_path):
    staging = tmp_path / "staging"
    staging.mkdir()
    (staging / JOURNAL).write_text("another-version\n0 config.json\n")
    result = await fetch(checkpoint.as_uri(), {}, staging)
    assert result.resumed_bytes == 0
    assert digests(staging) == digests(checkpoint)


async def test_a_missing_directory_is_model_not_found(tmp_path):
    with pytest.raises(StoreError) as raised:
        await fetch((tmp_path / "nothing").as_uri(), {}, tmp_path / "staging")
    assert (raised.value.code, raised.value.status) == ("model_not_found", 404)


def _rewrite_manifest(uri_dir, keep_blake3: bool) -> None:
    """As a manifest published before BLAKE3: sha256 only."""
    path = uri_dir / "llmfleet-manifest.json"
    body = json.loads(path.read_text())
    for entry in body["files"]:
        assert len(entry["blake3"]) == 64  # publish writes both digests
        if not keep_blake3:
            del entry["blake3"]
    path.write_text(json.dumps(body))


@pytest.mark.parametrize("digest", ["blake3", "sha256"])
async def test_blake3_and_sha256_only_manifests_verify_from_memory(checkpoint, tmp_path, digest):
    store = tmp_path / "store" / "model"
    quiet_publish(checkpoint, store.as_uri(), {})
    _rewrite_manifest(store, keep_blake3=digest == "blake3")
    files = await listing(store.as_uri())
    assert {f.digest[0] for f in files if f.digest} == {digest}
    result = await fetch(store.as_uri(), {}, tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)
    assert result.read_back_bytes == 0  # every byte hashed as it arrived


@pytest.mark.parametrize("digest", ["blake3", "sha256"])
async def test_a_corrupted_file_fails_either_digest(checkpoint, tmp_path, digest):
    store = tmp_path / "store" / "model"
    quiet_publish(checkpoint, store.as_uri(), {})
    _rewrite_manifest(store, keep_blake3=digest == "blake3")
    weights = store / "sub" / "model-00002-of-00002.safetensors"
    data = bytearray(weights.read_bytes())
    data[12345] ^= 0xFF  # same size: only the digest can tell
    weights.write_bytes(bytes(data))
    with pytest.raises(StoreError) as raised:
        await fetch(store.as_uri(), {}, tmp_path / "staging")
    assert raised.value.code == "checksum_mismatch"
    assert f"sub/model-00002-of-00002.safetensors: {digest}" in str(raised.value)
    assert not (tmp_path / "staging").exists()


async def test_beyond_the_memory_budget_ranges_are_hashed_from_the_page_cache(checkpoint, tmp_path):
    store = tmp_path / "store" / "model"
    quiet_publish(checkpoint, store.as_uri(), {})
    tight = DownloadSettings(concurrency=4, range_bytes=1 * MIB, hash_memory_bytes=0)
    result = await fetch(store.as_uri(), {}, tmp_path / "staging", tight)
    assert digests(tmp_path / "staging") == digests(checkpoint)
    assert result.read_back_bytes == sum(
        path.stat().st_size for path in checkpoint.rglob("*") if path.is_file()
    )
