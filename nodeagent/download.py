"""The downloader: a model's files from a store into a staging directory, at the speed of the wire.

Many concurrent range reads from one queue across all files of the model,
each pinned to the listing's ETag, read by the store straight into one of a
fixed set of reused, page-aligned buffers, and written from there into a
preallocated file with `O_DIRECT` where the filesystem takes it. Per byte that
is one copy from the socket and none into the page cache: on these VMs the
page cache's copy and fresh pages cost more CPU than the network and the hash
together (bench/README.md). A journal records finished ranges, so an interrupted download
(an agent restart, a store outage) resumes with only the missing ones.
Throttling and transient failures are retried with backoff until the
deadline. Each file is verified with BLAKE3 where its manifest has it, sha256
otherwise, hashed from the same buffer before it is reused (in file order)
rather than read back once written. Publishing the finished directory (an
atomic rename) is the cache's job.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import functools
import hashlib
import logging
import mmap
import os
import random
import shutil
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nodeagent.store.base import (
    RemoteFile,
    Store,
    StoreError,
    identity,
    new_blake3,
    thread_to_end,
)

log = logging.getLogger(__name__)

JOURNAL = ".llmfleet-journal"
LOCK = ".llmfleet-lock"
MIB = 1024 * 1024
# What O_DIRECT asks of offsets, lengths and buffers (512 on some disks; 4096 suits both).
ALIGN = 4096
# Codes after which the partial download is worthless: the store holds other bytes now.
DISCARD_PARTIAL = {"blob_changed", "checksum_mismatch", "size_mismatch", "bad_manifest"}


@dataclass(frozen=True)
class DownloadSettings:
    concurrency: int = 8
    range_bytes: int = 16 * MIB
    bandwidth_limit: float | None = None  # bytes per second, for the whole download
    # Buffers beyond one per range in flight, for ranges that finish before the hash
    # reaches them. None is the default: BLAKE3 outruns the wire, a range's buffer comes
    # back within milliseconds, and every extra buffer is fresh pages (measured: 0 spare
    # buffers 0.66-0.73 CPU-s/GiB, 32 MiB 0.77-0.79, 256 MiB 0.77-0.88, same MB/s).
    hash_memory_bytes: int = 0
    # Write with O_DIRECT where the filesystem takes it: no copy into the page cache, at the
    # price of the engine reading its weights from the disk rather than from memory.
    direct_io: bool = True


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
    # Bytes the hashes read back from disk (a resumed download's ranges); everything else
    # was hashed from the buffer it arrived in.
    read_back_bytes: int = 0
    # Bytes written with O_DIRECT; the rest (tails not a multiple of ALIGN, filesystems that
    # refuse it) through the page cache.
    direct_bytes: int = 0


@dataclass(frozen=True)
class _Range:
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


def _write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
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


class _Output:
    """One file being written: its O_DIRECT-aligned part without the page cache where the
    filesystem allows, the rest (a file's tail, or everything elsewhere) through it."""

    def __init__(self, path: Path, size: int, direct: bool) -> None:
        self.fd = _preallocate(path, size)
        self.direct_fd = -1
        self.direct_bytes = 0
        if direct and size >= ALIGN and hasattr(os, "O_DIRECT"):
            with contextlib.suppress(OSError):  # EINVAL: this filesystem has no direct I/O
                self.direct_fd = os.open(path, os.O_WRONLY | os.O_DIRECT)

    def write(self, data: memoryview, offset: int) -> None:
        """All of `data` at `offset` (in a worker thread). `data` starts page-aligned."""
        direct = 0
        if self.direct_fd >= 0 and offset % ALIGN == 0:
            direct = len(data) - len(data) % ALIGN
            try:
                _write_all(self.direct_fd, data[:direct], offset)
                self.direct_bytes += direct
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Accepted when opened, refused when written (some network filesystems).
                log.info("O_DIRECT refused writing a download; writing through the page cache")
                self.direct_fd, direct = -1, 0
        if direct < len(data):
            _write_all(self.fd, data[direct:], offset + direct)

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.direct_fd)


class _Buffers:
    """The download's reusable read buffers: page-aligned (O_DIRECT needs it), and the same
    pages again and again: a fresh page costs CPU to fault in and clear, about as much per
    byte as the network's copy. Made as needed, at most `count`: a fast hash rarely lets
    ranges pile up, so most downloads touch little more than the ranges in flight."""

    def __init__(self, count: int, size: int) -> None:
        self.size = max(ALIGN, -(-size // ALIGN) * ALIGN)
        self.count, self.made = count, 0
        self.free: asyncio.Queue[mmap.mmap] = asyncio.Queue()

    async def take(self) -> mmap.mmap:
        if self.free.empty() and self.made < self.count:
            self.made += 1
            # Private, not mmap's default shared mapping: no shmem file behind it. Populated
            # at once, in a thread: one call instead of a page fault per 4 KiB (measured:
            # 33,000 fewer faults and 0.1 CPU-s less per GiB), and the loop never waits on
            # it. Not MADV_HUGEPAGE: when memory had to be compacted for it, a download's
            # CPU doubled.
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | getattr(mmap, "MAP_POPULATE", 0)
            return await asyncio.to_thread(mmap.mmap, -1, self.size, flags=flags)
        return await self.free.get()  # first come, first served: ranges start in order

    def give(self, buffer: mmap.mmap) -> None:
        self.free.put_nowait(buffer)


class _StreamingHash:
    """The digest of one file (BLAKE3 or sha256), computed while it downloads.

    Both digests are sequential, and ranges finish nearly but not exactly in order: a
    finished range keeps its buffer (`remember`) until the hash reaches its start, then is
    hashed from it and the buffer goes back to the pool. What is only on disk (a resumed
    download's ranges) is read back. Hashing runs in a worker thread, one at a time: the
    event loop keeps the other core.

    No deadlock: ranges are started in file order, each by a worker that already holds a
    buffer, so the range the hash waits for is always in flight, never waiting for a buffer.
    """

    BLOCK = 8 * MIB

    def __init__(self, path: Path, size: int, kind: str, hashing: asyncio.Semaphore) -> None:
        self.path, self.size, self.hashing = path, size, hashing
        self.digest: Any = new_blake3() if kind == "blake3" else hashlib.sha256()
        self.cursor = 0
        # start -> (end, the bytes, what gives their buffer back)
        self.in_memory: dict[int, tuple[int, memoryview, Callable[[], None]]] = {}
        self.on_disk: list[tuple[int, int]] = []
        self.advanced = asyncio.Event()
        self.read_back = 0

    def remember(self, start: int, data: memoryview, release: Callable[[], None]) -> None:
        """A finished range's bytes; `release` is called once they are hashed."""
        if start < self.cursor:
            release()  # hashed already (read back from a resumed download)
            return
        self.in_memory[start] = (start + len(data), data, release)
        self.advanced.set()

    def add(self, start: int, end: int) -> None:
        """Bytes that are on disk only (a resumed download's)."""
        self.on_disk.append((start, end))
        self.advanced.set()

    def _next_stretch(self) -> tuple[int, memoryview | None, Callable[[], None]] | None:
        """(end, bytes, release) of the stretch at the cursor; bytes None: read it from disk."""
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
            return min([end, *starts]), None, lambda: None
        return None

    def _hash(self, stretches: list[tuple[int, int, memoryview | None]]) -> None:
        # The thread opens its own descriptor: a cancelled download may close everything
        # it holds while this thread still reads.
        fd = -1
        try:
            for start, end, data in stretches:
                if data is not None:
                    self.digest.update(data)
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
            stretches: list[tuple[int, int, memoryview | None]] = []
            releases: list[Callable[[], None]] = []
            position = self.cursor
            while (found := self._next_stretch()) is not None:
                end, data, release = found
                stretches.append((self.cursor, end, data))
                releases.append(release)
                self.cursor = end
            if not stretches:
                continue
            try:
                async with self.hashing:
                    await thread_to_end(self._hash, stretches)
            finally:
                for release in releases:
                    release()
            assert self.cursor > position
        return str(self.digest.hexdigest())


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
        give_up_after: float | None = None,
    ) -> None:
        self.store = store
        self.give_up_after = give_up_after
        self.files = list(files)
        self.staging = staging
        self.settings = settings
        self.progress = progress
        self.bandwidth = _Bandwidth(settings.bandwidth_limit)
        self.outputs: dict[str, _Output] = {}
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
                for file in self.files:
                    self.outputs[file.path] = _Output(
                        self.staging / file.path, file.size, self.settings.direct_io
                    )
                hashing = asyncio.Semaphore(1)
                self.hashes = {
                    f.path: _StreamingHash(self.staging / f.path, f.size, f.digest[0], hashing)
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
                for output in self.outputs.values():
                    output.close()
            self._verify(digests)
            verify_seconds = time.monotonic() - verifying
            (self.staging / JOURNAL).unlink()
        (self.staging / LOCK).unlink(missing_ok=True)
        return DownloadResult(
            self.fetched, resumed, self.ranges_fetched, self.retries,
            time.monotonic() - started, verify_seconds,
            sum(h.read_back for h in self.hashes.values()),
            sum(output.direct_bytes for output in self.outputs.values()),
        )  # fmt: skip

    def _clear_staging(self) -> None:
        for path in self.staging.iterdir():
            if path.name != LOCK:
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    async def _fetch_all(self, todo: list[_Range], journal: _Journal, deadline: float) -> None:
        queue: asyncio.Queue[_Range] = asyncio.Queue()
        for piece in todo:
            queue.put_nowait(piece)
        workers = min(self.settings.concurrency, len(todo)) or 1
        size = max((piece.end - piece.start for piece in todo), default=0)
        spare = self.settings.hash_memory_bytes // max(size, 1)
        buffers = _Buffers(min(len(todo), workers + spare) or 1, size)

        async def worker() -> None:
            while True:
                # The buffer first, the range after: whoever waited longest starts the
                # earliest range left, so the range a hash waits for never lacks a buffer.
                buffer = await buffers.take()
                if queue.empty():
                    buffers.give(buffer)
                    return
                piece = queue.get_nowait()
                data = memoryview(buffer)[: piece.end - piece.start]
                await self._fetch(piece, data, deadline)
                await thread_to_end(self.outputs[piece.file.path].write, data, piece.start)
                journal.record(piece)
                hashed = self.hashes.get(piece.file.path)
                if hashed is None:
                    buffers.give(buffer)
                else:
                    hashed.remember(piece.start, data, functools.partial(buffers.give, buffer))

        try:
            async with asyncio.timeout_at(deadline):
                async with asyncio.TaskGroup() as group:
                    for _ in range(workers):
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

    async def _fetch(self, piece: _Range, data: memoryview, deadline: float) -> None:
        """The range's bytes into `data`, retried with backoff while the store allows."""
        loop = asyncio.get_running_loop()
        delay, failing_since = 0.1, None
        while True:
            received = 0

            def arrived(count: int) -> None:
                nonlocal received
                received += count
                self.progress.add(count)

            await self.bandwidth.take(piece.end - piece.start)
            try:
                await self.store.read_range(piece.file, piece.start, piece.end, data, arrived)
            except StoreError as exc:
                self.progress.add(-received)  # the range starts over: do not count it twice
                if not exc.retryable:
                    raise
                self.last_error = str(exc)
                self.retries += 1
                if loop.time() + delay >= deadline:
                    raise self._gave_up("the store kept failing until the load deadline") from None
                failing_since = failing_since or loop.time()
                if self.give_up_after is not None and (
                    loop.time() + delay - failing_since >= self.give_up_after
                ):
                    raise self._gave_up(
                        f"the store kept failing for {self.give_up_after:g} s"
                    ) from None
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))  # noqa: S311 - jitter
                delay = min(delay * 2, 5.0)
                continue
            self.fetched += received
            self.ranges_fetched += 1
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
    give_up_after: float | None = None,
) -> DownloadResult:
    """Fetch `files` into `staging`; a partial left by a failure is kept if it can be resumed.

    `give_up_after`: seconds a range may keep failing before the download gives up, ahead of
    the deadline (when another source can take over)."""
    try:
        downloader = Downloader(store, files, staging, settings, progress, give_up_after)
        return await downloader.run(deadline)
    except StoreError as exc:
        if exc.code in DISCARD_PARTIAL:
            shutil.rmtree(staging, ignore_errors=True)
        raise
