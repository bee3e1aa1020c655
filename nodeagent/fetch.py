"""Getting a model's files into the cache: the one step between a source URI and an engine.

The cached copy is used when it is of the same revision from one of the model's
sources; otherwise a source's store is listed (its manifest and each file's
version), room is made in the cache, and the downloader fills a staging
directory that the cache then publishes atomically. A model published in
several stores is read from the first source that works, nearest first.
A download interrupted by a store outage or an agent restart leaves its
staging directory to resume from; one whose store changed under it, or
whose checksums fail, leaves nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.cache import CachedModel, ModelCache
from nodeagent.download import DownloadProgress, DownloadResult, DownloadSettings, download
from nodeagent.store import RemoteFile, Store, StoreError
from nodeagent.store.base import identity

log = logging.getLogger(__name__)

# Failures of this host, not of the source: another source would fail the same way.
LOCAL_FAILURES = {"cache_full", "download_in_progress"}


# Backoff between tries of a listing the store throttled, seconds.
LISTING_RETRY_DELAYS = (0.2, 0.5, 1.0, 2.0, 5.0)
# How long a listing may throttle before its source is given up, without a failover time.
LISTING_PATIENCE = 20.0


async def _listing(store: Store, deadline: float, patience: float | None) -> list[RemoteFile]:
    """The store's listing, tried again while the store answers with throttling or a server
    error (429, 5xx), for up to `patience` seconds, each try bounded by that time too. A
    store that does not answer at all is not waited for here: the next source takes over at
    once, or the load fails with a clear error (an outage in the middle of a download is the
    downloader's to ride out)."""
    loop = asyncio.get_running_loop()
    give_up = min(deadline, loop.time() + (patience or LISTING_PATIENCE))
    for delay in (*LISTING_RETRY_DELAYS, None):
        try:
            async with asyncio.timeout_at(give_up):
                return await store.listing()
        except TimeoutError:
            raise StoreError(
                "store_unreachable", f"{store.uri}: the listing did not finish in time", 504, True
            ) from None
        except StoreError as exc:
            if exc.code != "store_unavailable" or delay is None or loop.time() + delay >= give_up:
                raise
            log.info("%s: listing failed (%s); again in %.1f s", store.uri, exc, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


def _check_identity(uri: str, files: Sequence[RemoteFile], expected: str) -> None:
    """Refuse a source holding another model than the one registered (a mirror published
    from other files, or republished since): the next source is tried instead."""
    found = identity(files)
    if expected and found is not None and found != expected:
        raise StoreError(
            "manifest_mismatch",
            f"{uri} holds another model than the one registered (its manifest differs)",
            409,
        )


def _allocated(directory: Path) -> int:
    """Bytes a partial download already holds on disk (its files are sparse until written)."""
    if not directory.is_dir():
        return 0
    return sum(path.stat().st_blocks * 512 for path in directory.rglob("*") if path.is_file())


@dataclass(frozen=True)
class Fetched:
    """The cached copy, the download that filled it (None: it was there), its source, and
    the seconds from that source's listing to the verified last byte (0 when cached)."""

    cached: CachedModel
    result: DownloadResult | None
    source: str
    seconds: float = 0.0
    failed: tuple[str, ...] = ()  # the sources given up on first: "uri: why"


async def fetch_model(
    cache: ModelCache,
    sources: Sequence[str],
    open_store: Callable[[str], Store],
    model_id: str,
    revision: str,
    progress: DownloadProgress,
    settings: DownloadSettings,
    deadline: float,
    make_room: Callable[[int], Awaitable[None]],
    adapter_of: str = "",
    failover_seconds: float | None = None,
    manifest: str = "",
) -> Fetched:
    """The model's cached copy, downloaded first unless one of the same revision from any of
    `sources` is there. Sources are tried in order (the nearest first): a source that
    fails (unreachable past `failover_seconds` of retries, refusing the credentials, holding
    another manifest than `manifest`, the registered identity) hands over to the next,
    which resumes what the last one fetched. `open_store` runs in a thread: a cloud's
    client may look its credentials up over the network (an instance's metadata service).
    `adapter_of`: the files are a LoRA adapter of that model (nodeagent.adapters)."""
    for uri in sources:
        cached = cache.lookup(model_id, uri, revision)
        if cached is not None:
            progress.total = cached.size
            progress.add(cached.size)
            return Fetched(cached, None, uri)
    failures: list[str] = []
    loop = asyncio.get_running_loop()
    for position, uri in enumerate(sources):
        last = position == len(sources) - 1
        started = loop.time()
        try:
            store = await asyncio.to_thread(open_store, uri)
            files = await _listing(store, deadline, failover_seconds)
            _check_identity(uri, files, manifest)
            staging = cache.partial_directory(model_id)
            await make_room(max(sum(file.size for file in files) - _allocated(staging), 0))
            result = await download(
                store, files, staging, settings, progress, deadline,
                give_up_after=None if last else failover_seconds,
            )  # fmt: skip
        except StoreError as exc:
            if last or exc.code in LOCAL_FAILURES:
                if failures:
                    raise StoreError(
                        exc.code, "; ".join([*failures, f"{uri}: {exc}"]), exc.status,
                        exc.retryable,
                    ) from None  # fmt: skip
                raise
            log.warning("%s: source %s failed (%s), trying the next", model_id, uri, exc)
            failures.append(f"{uri}: {exc}")
            continue
        cached = cache.publish(staging, model_id, uri, revision, adapter_of)
        return Fetched(cached, result, uri, loop.time() - started, tuple(failures))
    raise StoreError("bad_source", f"{model_id}: no source to download from", 400)
