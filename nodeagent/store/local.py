"""A directory as a model store (`file:///dir`): the embedded default, or a shared disk."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path
from urllib.parse import unquote, urlsplit

from nodeagent.store.base import (
    MANIFEST_NAME,
    Manifest,
    RemoteFile,
    StoreError,
    join_listing,
    model_files,
    thread_to_end,
)


def local_path(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.scheme != "file" or parts.netloc or not parts.path.startswith("/"):
        raise StoreError("bad_uri", f"{uri!r} is not file:///<absolute directory>", 400)
    return Path(unquote(parts.path))


def _etag(path: Path) -> str:
    # What changes when the file is rewritten: the version a download pins its reads to.
    stat = path.stat()
    return f"{stat.st_mtime_ns:x}-{stat.st_size:x}-{stat.st_ino:x}"


class LocalStore:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.root = local_path(uri)

    async def listing(self) -> list[RemoteFile]:
        return await asyncio.to_thread(self._listing)

    def _listing(self) -> list[RemoteFile]:
        if not self.root.is_dir():
            raise StoreError("model_not_found", f"{self.uri} is not a directory on this host", 404)
        try:
            found = {
                p.relative_to(self.root).as_posix(): (p.stat().st_size, _etag(p))
                for p in model_files(self.root)
            }
            manifest_path = self.root / MANIFEST_NAME
            # A directory published by `publish` has a manifest; a plain checkpoint directory
            # is accepted too, with sizes checked but no checksums to verify.
            manifest = (
                Manifest.from_json(manifest_path.read_bytes()) if manifest_path.exists() else None
            )
        except PermissionError as exc:
            raise StoreError("access_denied", f"cannot read {self.uri}: {exc}", 403) from None
        return join_listing(manifest, found, self.uri)

    async def read_range(
        self,
        file: RemoteFile,
        start: int,
        end: int,
        buffer: memoryview,
        on_bytes: Callable[[int], None],
    ) -> None:
        await thread_to_end(self._read, file, start, buffer)
        on_bytes(end - start)

    def _read(self, file: RemoteFile, start: int, buffer: memoryview) -> None:
        path = self.root / file.path
        try:
            if _etag(path) != file.etag:
                raise StoreError(
                    "blob_changed", f"{file.path} changed in the store during the download", 409
                )
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise StoreError(
                "blob_changed", f"{file.path} disappeared from the store during the download", 409
            ) from None
        try:
            done = 0
            while done < len(buffer):
                count = os.preadv(fd, [buffer[done:]], start + done)
                if not count:
                    raise StoreError(
                        "blob_changed", f"{file.path} was shortened during the download", 409
                    )
                done += count
        finally:
            os.close(fd)
