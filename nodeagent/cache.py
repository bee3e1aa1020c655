"""The agent's model cache on local disk: one directory per model, published atomically.

Layout: `<cache>/models/<quoted model id>/` holds the checkpoint and
`.llmfleet.json` (model id, source, revision). A model is only ever visible
complete: files land in a temporary sibling that is renamed into place.
"""

from __future__ import annotations

import json
import shutil
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


def _size(directory: Path) -> int:
    return sum(path.stat().st_size for path in directory.rglob("*") if path.is_file())


class ModelCache:
    def __init__(self, root: Path) -> None:
        self.root = root

    def directory_for(self, model_id: str) -> Path:
        return self.root / quote(model_id, safe="")

    def lookup(self, model_id: str, source: str, revision: str) -> CachedModel | None:
        """The cached copy of exactly this source and revision, if there is one."""
        directory = self.directory_for(model_id)
        entry = self._read(directory)
        if entry is None or (entry.source, entry.revision) != (source, revision):
            return None
        return entry

    def scan(self) -> list[CachedModel]:
        """Every complete model on disk (the index rebuilt at start); partial copies are removed."""
        if not self.root.is_dir():
            return []
        found = []
        for directory in sorted(self.root.iterdir()):
            if directory.name.startswith(_PARTIAL):
                shutil.rmtree(directory, ignore_errors=True)
                continue
            entry = self._read(directory)
            if entry is not None:
                found.append(entry)
        return found

    def staging_directory(self, model_id: str) -> Path:
        """An empty directory to write a model into before `publish`."""
        self.root.mkdir(parents=True, exist_ok=True)
        staging = self.root / f"{_PARTIAL}{quote(model_id, safe='')}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        return staging

    def publish(self, staging: Path, model_id: str, source: str, revision: str) -> CachedModel:
        """Make a fully written staging directory the model's cached copy, atomically."""
        metadata = {"model_id": model_id, "source": source, "revision": revision}
        (staging / METADATA).write_text(json.dumps(metadata))
        target = self.directory_for(model_id)
        if target.exists():
            # An older revision: move it aside first, so the rename below stays atomic.
            old = target.with_name(f"{_PARTIAL}old-{target.name}")
            target.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(target)
        return CachedModel(model_id, source, revision, target, _size(target))

    def remove(self, model_id: str) -> None:
        shutil.rmtree(self.directory_for(model_id), ignore_errors=True)

    def _read(self, directory: Path) -> CachedModel | None:
        try:
            metadata = json.loads((directory / METADATA).read_text())
        except (OSError, ValueError):
            return None
        return CachedModel(
            metadata["model_id"],
            metadata["source"],
            metadata.get("revision", ""),
            directory,
            _size(directory),
        )
