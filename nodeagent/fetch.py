"""Getting a model's files into the cache: the one step the model store will replace.

`fetch_model` is the interface the rest of the agent uses. Today it copies a
`file:///dir` source; the model-store work puts the parallel range downloader
(and `azure://`) behind this same function.
"""

from __future__ import annotations

import asyncio
import shutil
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from nodeagent.cache import CachedModel, ModelCache

_CHUNK = 8 * 1024 * 1024


class FetchError(RuntimeError):
    """The source cannot be fetched; `code` says why, `status` is the HTTP status to answer."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code = code
        self.status = status


@dataclass
class Progress:
    """Bytes written so far and in all; read by heartbeats while a fetch runs."""

    done: int = 0
    total: int = 0


def local_source(source: str) -> Path:
    parts = urlsplit(source)
    if parts.scheme != "file":
        raise FetchError(
            "unsupported_source", f"{parts.scheme}:// sources need the model store", 501
        )
    directory = Path(unquote(parts.path))
    if not directory.is_dir():
        raise FetchError("source_not_found", f"{source} is not a directory on this host", 404)
    return directory


def _copy_tree(source: Path, destination: Path, progress: Progress) -> None:
    """Runs in a worker thread: disk reads must not stall the agent's event loop."""
    for path in sorted(source.rglob("*")):
        target = destination / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        with path.open("rb") as reader, target.open("wb") as writer:
            while chunk := reader.read(_CHUNK):
                writer.write(chunk)
                progress.done += len(chunk)
        shutil.copymode(path, target)


async def fetch_model(
    cache: ModelCache, model_id: str, source: str, revision: str, progress: Progress
) -> tuple[CachedModel, bool]:
    """The model's cached copy, fetched first unless it is already there; and whether it was."""
    cached = cache.lookup(model_id, source, revision)
    if cached is not None:
        progress.done = progress.total = cached.size
        return cached, True
    directory = local_source(source)
    progress.done, progress.total = (
        0,
        sum(p.stat().st_size for p in directory.rglob("*") if p.is_file()),
    )
    staging = cache.staging_directory(model_id)
    try:
        await asyncio.to_thread(_copy_tree, directory, staging, progress)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return cache.publish(staging, model_id, source, revision), False
