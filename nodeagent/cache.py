"""The agent's model cache on local disk: one directory per model, published atomically.

Layout: `<cache>/models/<quoted model id>/` holds the checkpoint and
`.llmfleet.json` (model id, source, revision); its modification time is the
model's last use. Downloads write into `.partial-<quoted model id>/`, kept
across restarts so they resume, and become a model only by a rename.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

METADATA = ".llmfleet.json"
_PARTIAL = ".partial-"


@dataclass(frozen=True)
class CachedModel:
    model_id: str
    source: str
    revision: str
    directory: Path
    size: int
    last_used: float
    adapter_of: str = ""  # a LoRA adapter's files: the model whose engines load it


@dataclass(frozen=True)
class CacheEntry:
    """What eviction weighs: a model's size, its last use, and whether it may go."""

    model_id: str
    size: int
    last_used: float
    in_use: bool


def plan_eviction(
    entries: Sequence[CacheEntry], needed: int, capacity: int | None, disk_free: int
) -> list[str] | None:
    """Model ids to delete, least recently used first, so `needed` bytes fit; None if impossible.

    Within `capacity` (None: no limit of its own) and the disk's free space. Models in use
    (an engine runs them, or they are loading) are never chosen.
    """
    used = sum(entry.size for entry in entries)

    def fits(freed: int) -> bool:
        within_capacity = capacity is None or used - freed + needed <= capacity
        return within_capacity and needed <= disk_free + freed

    chosen: list[str] = []
    freed = 0
    for entry in sorted((e for e in entries if not e.in_use), key=lambda e: e.last_used):
        if fits(freed):
            break
        chosen.append(entry.model_id)
        freed += entry.size
    return chosen if fits(freed) else None


def _size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def directory_for(self, model_id: str) -> Path:
        return self.root / quote(model_id, safe="")

    def partial_directory(self, model_id: str) -> Path:
        """Where a download of the model writes; kept until it is published or discarded."""
        self.root.mkdir(parents=True, exist_ok=True)
        return self.root / f"{_PARTIAL}{quote(model_id, safe='')}"

    def lookup(self, model_id: str, source: str, revision: str) -> CachedModel | None:
        """The cached copy of exactly this source and revision, if there is one."""
        entry = self._read(self.directory_for(model_id))
        if entry is None or (entry.source, entry.revision) != (source, revision):
            return None
        return entry

    def scan(self) -> list[CachedModel]:
        """Every complete model on disk: the index, rebuilt when the agent starts."""
        if not self.root.is_dir():
            return []
        entries = (
            self._read(path)
            for path in sorted(self.root.iterdir())
            if not path.name.startswith(".")
        )
        return [entry for entry in entries if entry is not None]

    def publish(
        self, staging: Path, model_id: str, source: str, revision: str, adapter_of: str = ""
    ) -> CachedModel:
        """Make a fully written staging directory the model's cached copy, atomically."""
        metadata = {"model_id": model_id, "source": source, "revision": revision}
        if adapter_of:
            metadata["adapter_of"] = adapter_of
        (staging / METADATA).write_text(json.dumps(metadata))
        target = self.directory_for(model_id)
        if target.exists():
            # An older revision: move it aside first, so the rename below stays atomic.
            old = self.root / f".old-{target.name}"
            shutil.rmtree(old, ignore_errors=True)
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(target)
        entry = self._read(target)
        assert entry is not None
        return entry

    def touch(self, model_id: str) -> None:
        """Record a use: eviction removes the least recently used first, also after a restart."""
        metadata = self.directory_for(model_id) / METADATA
        if metadata.exists():
            os.utime(metadata)

    def remove(self, model_id: str) -> None:
        shutil.rmtree(self.directory_for(model_id), ignore_errors=True)
        shutil.rmtree(self.partial_directory(model_id), ignore_errors=True)

    def _read(self, directory: Path) -> CachedModel | None:
        try:
            metadata_path = directory / METADATA
            metadata = json.loads(metadata_path.read_text())
            last_used = metadata_path.stat().st_mtime
        except (OSError, ValueError):
            return None
        return CachedModel(
            metadata["model_id"], metadata["source"], metadata.get("revision", ""), directory,
            _size(directory), last_used, metadata.get("adapter_of", ""),
        )  # fmt: skip
