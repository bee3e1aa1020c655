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

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from nodeagent.cache import CachedModel, ModelCache
from nodeagent.download import DownloadProgress, DownloadResult, DownloadSettings, download
from nodeagent.store import Store, StoreError

log = logging.getLogger(__name__)

# Failures of this host, not of the source: another source would fail the same way.
LOCAL_FAILURES = {"cache_full", "download_in_progress"}


@dataclass(frozen=True)
class Fetched:
    """The cached copy, the download that filled it (None: it was there) and its source."""

    cached: CachedModel
    result: DownloadResult | None
    source: str


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
) -> Fetched:
    """The model's cached copy, downloaded first unless one of the same revision from any of
    `sources` is there. Sources are tried in order (the nearest first): a source that
    fails (unreachable past `failover_seconds` of retries, refusing the credentials, holding
    another manifest) hands over to the next, which resumes what the last one fetched.
    `adapter_of`: the files are a LoRA adapter of that model (nodeagent.adapters)."""
    for uri in sources:
        cached = cache.lookup(model_id, uri, revision)
        if cached is not None:
            progress.total = cached.size
            progress.add(cached.size)
            return Fetched(cached, None, uri)
    failures: list[str] = []
    for position, uri in enumerate(sources):
        last = position == len(sources) - 1
        try:
            store = open_store(uri)
            files = await store.listing()
            await make_room(sum(file.size for file in files))
            staging = cache.partial_directory(model_id)
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
        return Fetched(cached, result, uri)
    raise StoreError("bad_source", f"{model_id}: no source to download from", 400)
