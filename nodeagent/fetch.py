"""Getting a model's files into the cache: the one step between a source URI and an engine.

The cached copy is used when it is of the same source and revision; otherwise
the store is listed (its manifest and each file's version), room is made in
the cache, and the downloader fills a staging directory that the cache then
publishes atomically. A download interrupted by a store outage or an agent
restart leaves its staging directory to resume from; one whose store
changed under it, or whose checksums fail, leaves nothing.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from nodeagent.cache import CachedModel, ModelCache
from nodeagent.download import DownloadProgress, DownloadResult, DownloadSettings, download
from nodeagent.store import Store


async def fetch_model(
    cache: ModelCache,
    store: Store,
    model_id: str,
    revision: str,
    progress: DownloadProgress,
    settings: DownloadSettings,
    deadline: float,
    make_room: Callable[[int], Awaitable[None]],
    adapter_of: str = "",
) -> tuple[CachedModel, DownloadResult | None]:
    """The model's cached copy, downloaded first unless the same source and revision is there.
    `adapter_of`: the files are a LoRA adapter of that model (nodeagent.adapters)."""
    cached = cache.lookup(model_id, store.uri, revision)
    if cached is not None:
        progress.total = cached.size
        progress.add(cached.size)
        return cached, None
    files = await store.listing()
    await make_room(sum(file.size for file in files))
    staging = cache.partial_directory(model_id)
    result = await download(store, files, staging, settings, progress, deadline)
    return cache.publish(staging, model_id, store.uri, revision, adapter_of), result
