"""A download's plan: which byte ranges of which files are still to fetch.

A model's version is named by a fingerprint of its listing (`fingerprint`); a journal
(`Journal`) records the byte intervals finished under that version, so that a download
interrupted by an agent restart or a store outage resumes with only the ranges missing
(`missing_ranges`), whatever range size wrote the journal. The downloader
(nodeagent.download) fetches the ranges; nodeagent.download_write writes them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from nodeagent.store.base import RemoteFile, identity


@dataclass(frozen=True)
class Range:
    """Bytes `start` to `end` (exclusive) of one file: one range read."""

    file: RemoteFile
    start: int
    end: int


def fingerprint(files: Sequence[RemoteFile]) -> str:
    """Names this exact version of the model: a journal for another version is void.

    By the manifest's digests where there are some (store.base.identity), not the store's
    versions: the same model published in two stores has the same bytes under other ETags,
    and a download one source left half done resumes from the other (verification checks
    the result). A listing without digests is named by its files' versions.
    """
    named = identity(files)
    if named is not None:
        return named
    text = "\n".join(f"{f.path}\t{f.size}\t{f.etag}" for f in sorted(files, key=lambda f: f.path))
    return hashlib.sha256(text.encode()).hexdigest()


class Journal:
    """Finished byte intervals, one `start end path` line each, after the fingerprint.

    Intervals, not range numbers: a resume with another range size still knows exactly
    which bytes are here.
    """

    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self.version = version

    def finished(self) -> dict[str, list[tuple[int, int]]] | None:
        """Intervals done by an earlier try at this version; None if the journal is of another."""
        try:
            lines = self.path.read_text().splitlines()
        except FileNotFoundError:
            return {}
        if not lines or lines[0] != self.version:
            return None
        done: dict[str, list[tuple[int, int]]] = {}
        for line in lines[1:]:
            start, end, path = [*line.split(" ", 2), "", ""][:3]
            if path and start.isdigit() and end.isdigit():  # a torn last line is simply not done
                done.setdefault(path, []).append((int(start), int(end)))
        return done

    def start(self) -> None:
        self.path.write_text(self.version + "\n")

    def record(self, piece: Range) -> None:
        # Appended after the bytes are written. The data is not fsynced: an agent crash
        # keeps the page cache, and the sha256 check catches what a power loss would tear.
        with self.path.open("a") as journal:
            journal.write(f"{piece.start} {piece.end} {piece.file.path}\n")


def missing_ranges(
    files: Sequence[RemoteFile], done: dict[str, list[tuple[int, int]]], size: int
) -> Iterator[Range]:
    """The bytes not yet here, as ranges of at most `size` bytes."""
    for file in files:
        position = 0
        for start, end in [*sorted(done.get(file.path, [])), (file.size, file.size)]:
            gap_end = min(start, file.size)
            for piece_start in range(position, gap_end, size):
                yield Range(file, piece_start, min(piece_start + size, gap_end))
            position = max(position, min(end, file.size))
