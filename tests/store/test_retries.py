"""Throttling, transient failures and exclusivity, with a store that fails on purpose."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from nodeagent.cache import ModelCache
from nodeagent.download import LOCK, DownloadProgress, DownloadSettings, download
from nodeagent.fetch import Fetched, fetch_model
from nodeagent.store import RemoteFile, Store, StoreError
from nodeagent.store.base import http_status_error
from nodeagent.store.local import LocalStore
from tests.store.conftest import MIB, digests


class FlakyStore:
    """A local store whose first `failures` reads of each range answer like a throttled server."""

    def __init__(
        self, inner: LocalStore, failures: int, status: int, listing_failures: int = 0
    ) -> None:
        self.inner, self.failures, self.status = inner, failures, status
        self.listing_failures = listing_failures
        self.uri = inner.uri
        self.attempts: dict[tuple[str, int], int] = {}
        self.listings = 0

    async def listing(self) -> list[RemoteFile]:
        self.listings += 1
        if self.listings <= self.listing_failures:
            raise http_status_error(self.status, "the listing", "slow down")
        return await self.inner.listing()

    async def read_range(
        self,
        file: RemoteFile,
        start: int,
        end: int,
        buffer: memoryview,
        on_bytes: Callable[[int], None],
    ) -> None:
        key = (file.path, start)
        self.attempts[key] = self.attempts.get(key, 0) + 1
        if self.attempts[key] <= self.failures:
            raise http_status_error(self.status, file.path, "slow down")
        await self.inner.read_range(file, start, end, buffer, on_bytes)


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_throttling_and_server_errors_are_retried_with_backoff(checkpoint, tmp_path, status):
    store = FlakyStore(LocalStore(checkpoint.as_uri()), failures=2, status=status)
    files = await store.listing()
    settings = DownloadSettings(range_bytes=8 * MIB)
    deadline = asyncio.get_running_loop().time() + 30
    result = await download(
        store, files, tmp_path / "staging", settings, DownloadProgress(), deadline
    )
    assert result.retries == 2 * len(store.attempts)
    assert digests(tmp_path / "staging") == digests(checkpoint)


@pytest.mark.parametrize(
    ("status", "code", "retryable"),
    [
        (404, "model_not_found", False),
        (403, "access_denied", False),
        (412, "blob_changed", False),
        (429, "store_unavailable", True),
        (503, "store_unavailable", True),
        (400, "store_error", False),
    ],
)
def test_store_answers_map_to_errors(status, code, retryable):
    error = http_status_error(status, "model.safetensors", "")
    assert (error.code, error.retryable) == (code, retryable)


async def test_one_download_per_model_at_a_time(checkpoint, tmp_path):
    store = LocalStore(checkpoint.as_uri())
    files = await store.listing()
    staging = tmp_path / "staging"
    slow = DownloadSettings(concurrency=1, range_bytes=1 * MIB, bandwidth_limit=20e6)
    deadline = asyncio.get_running_loop().time() + 30
    first = asyncio.create_task(download(store, files, staging, slow, DownloadProgress(), deadline))
    while not (staging / LOCK).exists():  # noqa: ASYNC110 - a file appearing has no event
        await asyncio.sleep(0.01)
    with pytest.raises(StoreError) as raised:
        await download(store, files, staging, DownloadSettings(), DownloadProgress(), deadline)
    assert (raised.value.code, raised.value.status) == ("download_in_progress", 409)
    await first
    assert digests(staging) == digests(checkpoint)


async def fetch_through(stores: dict[str, Store], tmp_path, failover: float = 20) -> Fetched:
    async def room(needed: int) -> None:
        return None

    deadline = asyncio.get_running_loop().time() + 30
    return await fetch_model(
        ModelCache(tmp_path / "cache"), list(stores), stores.__getitem__, "org/m", "",
        DownloadProgress(), DownloadSettings(), deadline, room, failover_seconds=failover,
    )  # fmt: skip


@pytest.mark.parametrize("status", [429, 503])
async def test_a_throttled_listing_is_asked_again(checkpoint, tmp_path, status):
    store = FlakyStore(LocalStore(checkpoint.as_uri()), 0, status, listing_failures=2)
    fetched = await fetch_through({store.uri: store}, tmp_path)
    assert store.listings == 3
    assert digests(fetched.cached.directory) == digests(checkpoint)


async def test_a_listing_throttled_past_the_failover_time_hands_over(checkpoint, tmp_path):
    busy = FlakyStore(LocalStore(checkpoint.as_uri()), 0, 503, listing_failures=100)
    mirror = LocalStore(checkpoint.as_uri() + "/")
    started = asyncio.get_running_loop().time()
    fetched = await fetch_through({busy.uri: busy, mirror.uri: mirror}, tmp_path, failover=1.0)
    assert fetched.source == mirror.uri
    assert 2 <= busy.listings <= 4  # asked again for about a second, not until the deadline
    assert asyncio.get_running_loop().time() - started < 5


async def test_a_store_that_does_not_answer_hands_over_at_once(checkpoint, tmp_path):
    class Unreachable(FlakyStore):
        async def listing(self) -> list[RemoteFile]:
            self.listings += 1
            raise StoreError("store_unreachable", "connection refused", 503, True)

    dead = Unreachable(LocalStore((tmp_path / "gone").as_uri()), 0, 503)
    mirror = LocalStore(checkpoint.as_uri())
    fetched = await fetch_through({dead.uri: dead, mirror.uri: mirror}, tmp_path)
    assert (fetched.source, dead.listings) == (mirror.uri, 1)
