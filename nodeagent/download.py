"""The downloader: a model's files from a store into a staging directory, at the speed of the wire.

Many concurrent range reads from one queue across all files of the model,
each written with `pwrite` into a preallocated file and pinned to the
listing's ETag. A journal records finished ranges, so an interrupted download
(an agent restart, a store outage) resumes with only the missing ones.
Throttling and transient failures are retried with backoff until the
deadline. Each file is verified with BLAKE3 where its manifest has it, sha256
otherwise, hashed from the bytes as they arrive (in file order, from memory)
rather than read back once written. Publishing the finished directory (an
atomic rename) is the cache's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import logging
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.store.base import RemoteFile, Store, StoreError, new_blake3

log = logging.getLogger(__name__)

JOURNAL = ".llmfleet-journal"
LOCK = ".llmfleet-lock"
MIB = 1024 * 1024
# Codes after which the partial download is worthless: the store holds other bytes now.
DISCARD_PARTIAL = {"blob_changed", "checksum_mismatch", "size_mismatch", "bad_manifest"}


@dataclass(frozen=True)
class DownloadSettings:
    concurrency: int = 8
    range_bytes: int = 16 * MIB
    bandwidth_limit: float | None = None  # bytes per second, for the whole download
    # Finished ranges kept in memory until the hash reaches them; beyond this they are read
    # back from the page cache instead.
    hash_memory_bytes: int = 256 * MIB


@dataclass
class DownloadProgress:
    """Bytes done and in all, and the recent rate: what heartbeats show while a download runs."""

    done: int = 0
    total: int = 0
    phase: str = "downloading"  # then "verifying", while the last checksums finish
    _samples: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=64))

    def add(self, count: int) -> None:
        self.done += count
        self._samples.append((time.monotonic(), self.done))

    @property
    def bytes_per_second(self) -> float:
        """Throughput over the last three seconds of samples."""
        now = time.monotonic()
        recent = [(t, done) for t, done in self._samples if now - t <= 3.0]
        if len(recent) < 2 or recent[-1][0] <= recent[0][0]:
            return 0.0
        return (recent[-1][1] - recent[0][1]) / (recent[-1][0] - recent[0][0])


@dataclass(frozen=True)
class DownloadResult:
    fetched_bytes: int
    resumed_bytes: int
    ranges_fetched: int
    retries: int
    seconds: float
    verify_seconds: float
    # Bytes the hashes read back from disk (resumed ranges, or beyond the memory budget);
    # everything else was hashed from memory as it arrived.
    read_back_bytes: int = 0


@dataclass(frozen=True)
class _Range:
    file: RemoteFile
    start: int
    end: int


def fingerprint(files: Sequence[RemoteFile]) -> str:
    """Names this exact version of the model: a journal for another version is void."""
    text = "\n".join(
        f"{f.path}\t{f.size}\t{f.etag}\t{f.sha256}\t{f.blake3 or ''}"
        for f in sorted(files, key=lambda f: f.path)
    )
    return hashlib.sha256(text.encode()).hexdigest()


class _Journal:
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

    def record(self, piece: _Range) -> None:
        # Appended after the bytes are written. The data is not fsynced: an agent crash
        # keeps the page cache, and the sha256 check catches what a power loss would tear.
        with self.path.open("a") as journal:
            journal.write(f"{piece.start} {piece.end} {piece.file.path}\n")


class _Bandwidth:
    """A pacing gate for an operator's bandwidth limit."""

    def __init__(self, bytes_per_second: float | None) -> None:
        self.rate = bytes_per_second
        self.next_free = 0.0

    async def take(self, count: int) -> None:
        if not self.rate:
            return
        now = asyncio.get_running_loop().time()
        start = max(self.next_free, now)
        self.next_free = start + count / self.rate
        if start > now:
            await asyncio.sleep(start - now)


def missing_ranges(
    files: Sequence[RemoteFile], done: dict[str, list[tuple[int, int]]], size: int
) -> Iterator[_Range]:
    """The bytes not yet here, as ranges of at most `size` bytes."""
    for file in files:
        position = 0
        for start, end in [*sorted(done.get(file.path, [])), (file.size, file.size)]:
            gap_end = min(start, file.size)
            for piece_start in range(position, gap_end, size):
                yield _Range(file, piece_start, min(piece_start + size, gap_end))
            position = max(position, min(end, file.size))


def _write_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite until every byte is written: a short write would leave a hole that hashing
    the received bytes (not the file) would not see."""
    view = memoryview(data)
    while view:
        count = os.pwrite(fd, view, offset)
        view, offset = view[count:], offset + count


def _preallocate(path: Path, size: int) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if os.fstat(fd).st_size != size:
        os.ftruncate(fd, size)
        if size:
            # Claims the blocks now: a full disk fails here, not in the middle.
            os.posix_fallocate(fd, 0, size)
    return fd


class _StreamingHash:
    """The digest of one file (BLAKE3 or sha256), computed while it downloads.

    Both digests are sequential, and ranges finish nearly but not exactly in order: a
    finished range's bytes stay in memory (`remember`) until the hash reaches its start,
    then are hashed without touching the disk. What is only on disk (a resumed download's
    ranges, or ranges beyond the memory budget) is read back from the page cache.
    Hashing runs in a worker thread, one at a time: the event loop keeps the other core.
    """

    BLOCK = 8 * MIB

    def __init__(self, path: Path, size: int, kind: str, hashing: asyncio.Semaphore,
                 budget: _Budget) -> None:  # fmt: skip
        self.path, self.size, self.hashing, self.budget = path, size, hashing, budget
        self.digest: Any = new_blake3() if kind == "blake3" else hashlib.sha256()
        self.cursor = 0
        self.in_memory: dict[int, tuple[int, list[bytes]]] = {}  # start -> (end, chunks)
        self.on_disk: list[tuple[int, int]] = []
        self.advanced = asyncio.Event()
        self.read_back = 0

    def remember(self, start: int, end: int, chunks: list[bytes]) -> None:
        """A finished range, with its bytes if the budget allows."""
        if start < self.cursor:
            return  # hashed already (a retried range brings the same bytes again)
        if self.budget.take(end - start):
            self.in_memory[start] = (end, chunks)
        else:
            self.on_disk.append((start, end))
        self.advanced.set()

    def add(self, start: int, end: int) -> None:
        """Bytes that are on disk only (a resumed download's)."""
        self.on_disk.append((start, end))
        self.advanced.set()

    def _next_stretch(self) -> tuple[int, list[bytes] | None] | None:
        """(end, chunks) of the stretch at the cursor; chunks None: read it from disk."""
        found = self.in_memory.pop(self.cursor, None)
        if found is not None:
            return found
        self.on_disk.sort()
        while self.on_disk and self.on_disk[0][1] <= self.cursor:
            self.on_disk.pop(0)
        if self.on_disk and self.on_disk[0][0] <= self.cursor:
            end = self.on_disk.pop(0)[1]
            # Up to the next stretch in memory, so no byte is hashed twice.
            starts = [start for start in self.in_memory if self.cursor < start < end]
            return min([end, *starts]), None
        return None

    def _hash(self, stretches: list[tuple[int, int, list[bytes] | None]]) -> None:
        # The thread opens its own descriptor: a cancelled download may close everything
        # it holds while this thread still reads.
        fd = -1
        try:
            for start, end, chunks in stretches:
                if chunks is not None:
                    for chunk in chunks:
                        self.digest.update(chunk)
                    continue
                if fd < 0:
                    fd = os.open(self.path, os.O_RDONLY)
                for offset in range(start, end, self.BLOCK):
                    self.digest.update(os.pread(fd, min(self.BLOCK, end - offset), offset))
                self.read_back += end - start
        finally:
            if fd >= 0:
                os.close(fd)

    async def run(self) -> str:
        while self.cursor < self.size:
            await self.advanced.wait()
            self.advanced.clear()
            stretches: list[tuple[int, int, list[bytes] | None]] = []
            position = self.cursor
            while (found := self._next_stretch()) is not None:
                end, chunks = found
                stretches.append((self.cursor, end, chunks))
                self.cursor = end
            if not stretches:
                continue
            try:
                async with self.hashing:
                    await asyncio.to_thread(self._hash, stretches)
            finally:
                self.budget.give(sum(end - start for start, end, c in stretches if c is not None))
            assert self.cursor > position
        return str(self.digest.hexdigest())


class _Budget:
    """Bytes of finished ranges held in memory for hashing, across a download's files."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, count: int) -> bool:
        if self.used + count > self.limit:
            return False
        self.used += count
        return True

    def give(self, count: int) -> None:
        self.used -= count


@contextlib.contextmanager
def _exclusive(staging: Path) -> Iterator[None]:
    """One download per model at a time, even across agent processes sharing a cache."""
    with (staging / LOCK).open("w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StoreError(
                "download_in_progress", f"another download is writing {staging}", 409
            ) from None
        yield


class Downloader:
    def __init__(
        self,
        store: Store,
        files: Sequence[RemoteFile],
        staging: Path,
        settings: DownloadSettings,
        progress: DownloadProgress,
    ) -> None:
        self.store = store
        self.files = list(files)
        self.staging = staging
        self.settings = settings
        self.progress = progress
        self.bandwidth = _Bandwidth(settings.bandwidth_limit)
        self.fds: dict[str, int] = {}
        self.hashes: dict[str, _StreamingHash] = {}
        self.retries = 0
        self.fetched = 0
        self.ranges_fetched = 0
        self.last_error = ""

    async def run(self, deadline: float) -> DownloadResult:
        """Download into the staging directory and verify; raise StoreError on failure."""
        self.staging.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with _exclusive(self.staging):
            journal = _Journal(self.staging / JOURNAL, fingerprint(self.files))
            done = journal.finished()
            if done is None:  # a partial download of another version: start over
                self._clear_staging()
                done = {}
            if not done:
                journal.start()
            todo = list(missing_ranges(self.files, done, self.settings.range_bytes))
            total = sum(file.size for file in self.files)
            resumed = total - sum(piece.end - piece.start for piece in todo)
            self.progress.total, self.progress.done = total, 0
            self.progress.add(resumed)
            if resumed:
                log.info("resuming %s: %d of %d bytes already here", self.store.uri, resumed, total)
            try:
                self.fds = {f.path: _preallocate(self.staging / f.path, f.size) for f in self.files}
                hashing = asyncio.Semaphore(1)
                budget = _Budget(self.settings.hash_memory_bytes)
                self.hashes = {
                    f.path: _StreamingHash(
                        self.staging / f.path, f.size, f.digest[0], hashing, budget
                    )
                    for f in self.files
                    if f.digest is not None
                }
                for path, intervals in done.items():
                    for start, end in intervals:
                        if path in self.hashes:
                            self.hashes[path].add(start, end)
                hashers = {path: asyncio.create_task(h.run()) for path, h in self.hashes.items()}
                try:
                    await self._fetch_all(todo, journal, deadline)
                    self.progress.phase = "verifying"
                    verifying = time.monotonic()
                    digests = {path: await task for path, task in hashers.items()}
                finally:
                    for task in hashers.values():
                        task.cancel()
                    await asyncio.gather(*hashers.values(), return_exceptions=True)
            finally:
                for fd in self.fds.values():
                    os.close(fd)
            self._verify(digests)
            verify_seconds = time.monotonic() - verifying
            (self.staging / JOURNAL).unlink()
        (self.staging / LOCK).unlink(missing_ok=True)
        return DownloadResult(
            self.fetched, resumed, self.ranges_fetched, self.retries,
            time.monotonic() - started, verify_seconds,
            sum(h.read_back for h in self.hashes.values()),
        )  # fmt: skip

    def _clear_staging(self) -> None:
        for path in self.staging.iterdir():
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    async def _fetch_all(self, todo: list[_Range], journal: _Journal, deadline: float) -> None:
        queue: asyncio.Queue[_Range] = asyncio.Queue()
        for piece in todo:
            queue.put_nowait(piece)

        async def worker() -> None:
            while not queue.empty():
                piece = queue.get_nowait()
                await self._fetch(piece, deadline)
                journal.record(piece)

        try:
            async with asyncio.timeout_at(deadline):
                async with asyncio.TaskGroup() as group:
                    for _ in range(min(self.settings.concurrency, len(todo)) or 1):
                        group.create_task(worker())
        except TimeoutError:
            raise self._gave_up("the download did not finish before the load deadline") from None
        except BaseExceptionGroup as failures:
            # The first store error says what went wrong; anything else (a full disk) as it is.
            errors = [exc for exc in failures.exceptions if isinstance(exc, StoreError)]
            raise (errors[0] if errors else failures.exceptions[0]) from None

    def _gave_up(self, why: str) -> StoreError:
        detail = f"; last error: {self.last_error}" if self.last_error else ""
        done = f"{self.progress.done} of {self.progress.total} bytes"
        return StoreError(
            "store_unreachable", f"{why} ({done}, {self.retries} retries){detail}", 504, True
        )

    async def _fetch(self, piece: _Range, deadline: float) -> None:
        loop = asyncio.get_running_loop()
        fd = self.fds[piece.file.path]
        delay = 0.1
        while True:
            written = 0
            chunks: list[bytes] = []
            keep = piece.file.path in self.hashes

            def sink(
                offset: int, data: bytes, chunks: list[bytes] = chunks, keep: bool = keep
            ) -> None:
                nonlocal written
                _write_all(fd, data, offset)
                if keep:
                    chunks.append(data)
                written += len(data)
                self.progress.add(len(data))

            await self.bandwidth.take(piece.end - piece.start)
            try:
                await self.store.read_range(piece.file, piece.start, piece.end, sink)
            except StoreError as exc:
                self.progress.add(-written)  # the range starts over: do not count it twice
                if not exc.retryable:
                    raise
                self.last_error = str(exc)
                self.retries += 1
                if loop.time() + delay >= deadline:
                    raise self._gave_up("the store kept failing until the load deadline") from None
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                delay = min(delay * 2, 5.0)
                continue
            self.fetched += written
            self.ranges_fetched += 1
            if keep:
                self.hashes[piece.file.path].remember(piece.start, piece.end, chunks)
            return

    def _verify(self, digests: dict[str, str]) -> None:
        """Sizes, and the digests computed during the download, against the manifest."""
        for file in self.files:
            size = (self.staging / file.path).stat().st_size
            if size != file.size:
                raise StoreError(
                    "size_mismatch", f"{file.path} is {size} bytes, the manifest says {file.size}"
                )
            if file.digest is None:
                continue
            kind, expected = file.digest
            digest = digests.get(file.path)
            if digest != expected:
                raise StoreError(
                    "checksum_mismatch",
                    f"{file.path}: {kind} {digest[:16] if digest else '?'}… is not the "
                    f"manifest's {expected[:16]}…",
                )


async def download(
    store: Store,
    files: Sequence[RemoteFile],
    staging: Path,
    settings: DownloadSettings,
    progress: DownloadProgress,
    deadline: float,
) -> DownloadResult:
    """Fetch `files` into `staging`; a partial left by a failure is kept if it can be resumed."""
    try:
        return await Downloader(store, files, staging, settings, progress).run(deadline)
    except StoreError as exc:
        if exc.code in DISCARD_PARTIAL:
            shutil.rmtree(staging, ignore_errors=True)
        raise
