"""The same downloader with `file://` sources."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from nodeagent.download import JOURNAL, DownloadProgress, DownloadSettings
from nodeagent.store import StoreError
from tests.store.conftest import MIB, digests, fetch, quiet_publish, when_progress


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
