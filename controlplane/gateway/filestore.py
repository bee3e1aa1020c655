"""Where the files of `/v1/files` are kept: the store named by FILES_STORE (an `azure://`,
`s3://` or `gs://` prefix, with the same credentials the agents' model stores take from the
environment), else `VAR_DIR/files` on this host (the embedded default: one host only).

The calls block (the stores' own clients are blocking for writes, as publishing is); views
run them in a thread. Each file is one object named by its id.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from django.conf import settings

from nodeagent.store.base import Bucket, StoreError
from nodeagent.store.open import open_bucket


class FileStore:
    """One place files go: a bucket prefix, or a local directory."""

    def __init__(self, uri: str, directory: Path) -> None:
        self.uri = uri
        self.directory = directory
        self._bucket: Bucket | None = None

    @property
    def location(self) -> str:
        return self.uri or self.directory.as_uri()

    def bucket(self) -> Bucket:
        if self._bucket is None:
            self._bucket = open_bucket(self.uri, os.environ)
            self._bucket.prepare()
        return self._bucket

    def put(self, name: str, data: bytes) -> None:
        if self.uri:
            self.bucket().put(name, data)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{name}.partial"
        partial.write_bytes(data)
        partial.replace(self.directory / name)  # whole or not at all

    def put_path(self, name: str, path: Path) -> None:
        """A local file's bytes, streamed (a batch's output may be large)."""
        if self.uri:
            self.bucket().upload(name, path, lambda sent: None)
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self.directory / f".{name}.partial"
        shutil.copyfile(path, partial)
        partial.replace(self.directory / name)

    def get(self, name: str) -> bytes:
        """The file's bytes; StoreError `file_not_found` when it is gone."""
        if self.uri:
            return self.bucket().get(name, f"{name} is not in {self.uri}", 1 << 40)
        try:
            return (self.directory / name).read_bytes()
        except FileNotFoundError:
            raise StoreError("file_not_found", f"{name} is not in {self.directory}", 404) from None

    def remove(self, name: str) -> None:
        if self.uri:
            self.bucket().remove(name)
            return
        (self.directory / name).unlink(missing_ok=True)


_stores: dict[tuple[str, str], FileStore] = {}


def current() -> FileStore:
    """The store the settings name (one per setting, kept for the process)."""
    key = (settings.FILES_STORE, str(settings.VAR_DIR))
    if key not in _stores:
        _stores[key] = FileStore(settings.FILES_STORE, Path(settings.VAR_DIR) / "files")
    return _stores[key]
