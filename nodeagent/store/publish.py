"""`python -m nodeagent publish LOCAL_DIR URI`: put a checkpoint in a store, manifest last.

The manifest is what makes a prefix a model: it is removed before any file is
(re)written and uploaded only after every file is in place, so a reader never
sees a partial upload as a complete model, and publishing twice is safe.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TextIO

from nodeagent.store.base import MANIFEST_NAME, Bucket, Manifest, StoreError
from nodeagent.store.local import local_path
from nodeagent.store.open import open_bucket

UPLOAD_THREADS = 4


class ProgressBar:
    """A one-line progress bar on stderr (a plain line every few seconds when not a terminal)."""

    def __init__(self, label: str, total: int, stream: TextIO = sys.stderr) -> None:
        self.label, self.total, self.stream = label, max(total, 1), stream
        self.done = 0
        self.started = self.shown = time.monotonic()
        self.lock = threading.Lock()
        self.tty = stream.isatty()

    def add(self, count: int) -> None:
        with self.lock:
            self.done += count
            now = time.monotonic()
            if now - self.shown >= (0.1 if self.tty else 5.0) or self.done >= self.total:
                self.shown = now
                self._show(now)

    def _show(self, now: float) -> None:
        share = min(self.done / self.total, 1.0)
        rate = self.done / max(now - self.started, 1e-6) / 1e6
        bar = "#" * int(share * 30)
        sizes = f"{self.done / 1e6:,.1f}/{self.total / 1e6:,.1f} MB"
        line = f"{self.label} [{bar:<30}] {share:4.0%} {sizes} {rate:,.0f} MB/s"
        self.stream.write(("\r" + line) if self.tty else line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


def publish(
    local_dir: Path, uri: str, environ: Mapping[str, str], stream: TextIO = sys.stderr
) -> Manifest:
    """Publish `local_dir` at `uri` and return its manifest."""
    if not local_dir.is_dir():
        raise StoreError("bad_source", f"{local_dir} is not a directory", 400)
    total = sum(path.stat().st_size for path in local_dir.rglob("*") if path.is_file())
    hashing = ProgressBar("hashing  ", total, stream)
    manifest = Manifest.of_directory(local_dir, hashing.add)
    hashing.close()
    uploading = ProgressBar("uploading", manifest.total_size, stream)
    if uri.startswith("file://"):
        _publish_local(local_dir, local_path(uri), manifest, uploading)
    else:
        _publish_bucket(local_dir, open_bucket(uri, environ), manifest, uploading)
    uploading.close()
    return manifest


def _publish_local(source: Path, target: Path, manifest: Manifest, bar: ProgressBar) -> None:
    staging = target.with_name(f".{target.name}.publishing")
    shutil.rmtree(staging, ignore_errors=True)
    for file in manifest.files:
        destination = staging / file.path
        destination.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / file.path, destination)
        bar.add(file.size)
    (staging / MANIFEST_NAME).write_text(manifest.to_json())
    if target.exists():
        old = target.with_name(f".{target.name}.replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(target, old)
        os.rename(staging, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, target)


def _publish_bucket(source: Path, bucket: Bucket, manifest: Manifest, bar: ProgressBar) -> None:
    bucket.prepare()
    # First make the prefix not-a-model, so readers never mix old and new files.
    bucket.remove(MANIFEST_NAME)
    with ThreadPoolExecutor(UPLOAD_THREADS) as pool:
        uploads = [
            pool.submit(bucket.upload, file.path, source / file.path, bar.add)
            for file in manifest.files
        ]
        for upload in uploads:
            upload.result()  # the first failure, after the others finished or failed
    bucket.put(MANIFEST_NAME, manifest.to_json().encode())
