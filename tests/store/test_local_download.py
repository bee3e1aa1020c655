"""The same downloader with `file://` sources."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os

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


async def test_without_spare_buffers_every_range_is_still_hashed_from_memory(checkpoint, tmp_path):
    # As many buffers as ranges in flight: each waits for the hash to give one back, and
    # none is ever read back from disk (nor does the download deadlock).
    store = tmp_path / "store" / "model"
    quiet_publish(checkpoint, store.as_uri(), {})
    tight = DownloadSettings(concurrency=4, range_bytes=1 * MIB, hash_memory_bytes=0)
    result = await fetch(store.as_uri(), {}, tmp_path / "staging", tight)
    assert digests(tmp_path / "staging") == digests(checkpoint)
    assert result.read_back_bytes == 0
    assert result.ranges_fetched == 24 + 17 + 1


def _takes_direct_io(directory) -> bool:
    probe = directory / "probe"
    probe.write_bytes(b"")
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
    except OSError:
        return False
    return True


WEIGHTS = 40 * MIB  # the checkpoint's aligned bytes; the 123-byte tail and config.json are not


async def test_weights_are_written_around_the_page_cache_and_tails_through_it(checkpoint, tmp_path):
    if not _takes_direct_io(tmp_path):
        pytest.skip(f"{tmp_path}'s filesystem has no O_DIRECT")
    result = await fetch(checkpoint.as_uri(), {}, tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)
    assert result.direct_bytes == WEIGHTS

    off = DownloadSettings(direct_io=False)
    result = await fetch(checkpoint.as_uri(), {}, tmp_path / "buffered", off)
    assert digests(tmp_path / "buffered") == digests(checkpoint)
    assert result.direct_bytes == 0


@pytest.mark.parametrize("refused", ["open", "write"])
async def test_a_filesystem_that_refuses_direct_io_gets_buffered_writes(
    checkpoint, tmp_path, monkeypatch, refused
):
    # What some network filesystems do: EINVAL on open with O_DIRECT, or only on the write.
    real_open, real_pwrite = os.open, os.pwrite
    direct_fds: set[int] = set()

    def open_(path, flags, *args):
        if flags & os.O_DIRECT:
            if refused == "open":
                raise OSError(errno.EINVAL, "Invalid argument")
            fd = real_open(path, flags, *args)
            direct_fds.add(fd)
            return fd
        return real_open(path, flags, *args)

    def pwrite(fd, data, offset):
        if fd in direct_fds:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "open", open_)
    monkeypatch.setattr(os, "pwrite", pwrite)
    result = await fetch(checkpoint.as_uri(), {}, tmp_path / "staging")
    assert digests(tmp_path / "staging") == digests(checkpoint)
    assert result.direct_bytes == 0
    assert bool(direct_fds) == (refused == "write")
