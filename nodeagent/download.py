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

This module is the orchestration (workers, retries, bandwidth, verification); the
ranges to fetch and the resume journal are nodeagent.download_plan's, the buffers,
files and digests nodeagent.download_write's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import random
import shutil
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nodeagent.download_plan import Journal, Range, fingerprint, missing_ranges
from nodeagent.download_write import MIB, Buffers, FileOutput, StreamingHash
from nodeagent.store.base import RemoteFile, Store, StoreError, thread_to_end

log = logging.getLogger(__name__)

JOURNAL = ".llmfleet-journal"
LOCK = ".llmfleet-lock"
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
        self.outputs: dict[str, FileOutput] = {}
        self.hashes: dict[str, StreamingHash] = {}
        self.retries = 0
        self.fetched = 0
        self.ranges_fetched = 0
        self.last_error = ""

    async def run(self, deadline: float) -> DownloadResult:
        """Download into the staging directory and verify; raise StoreError on failure."""
        self.staging.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        with _exclusive(self.staging):
            journal = Journal(self.staging / JOURNAL, fingerprint(self.files))
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
                    self.outputs[file.path] = FileOutput(
                        self.staging / file.path, file.size, self.settings.direct_io
                    )
                hashing = asyncio.Semaphore(1)
                self.hashes = {
                    f.path: StreamingHash(self.staging / f.path, f.size, f.digest[0], hashing)
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

    async def _fetch_all(self, todo: list[Range], journal: Journal, deadline: float) -> None:
        queue: asyncio.Queue[Range] = asyncio.Queue()
        for piece in todo:
            queue.put_nowait(piece)
        workers = min(self.settings.concurrency, len(todo)) or 1
        size = max((piece.end - piece.start for piece in todo), default=0)
        spare = self.settings.hash_memory_bytes // max(size, 1)
        buffers = Buffers(min(len(todo), workers + spare) or 1, size)

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

    async def _fetch(self, piece: Range, data: memoryview, deadline: float) -> None:
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
