"""Where a download's bytes go: reused buffers, preallocated files, streaming digests.

Each range is read by the store straight into one of a fixed set of reused,
page-aligned buffers (`Buffers`), written from there into a preallocated file with
`O_DIRECT` where the filesystem takes it (`FileOutput`), and hashed from the same
buffer before it is reused (`StreamingHash`): per byte, one copy from the socket and
none into the page cache (bench/README.md). The downloader (nodeagent.download) drives
them.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import mmap
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nodeagent.store.base import new_blake3, thread_to_end

log = logging.getLogger(__name__)

MIB = 1024 * 1024
# What O_DIRECT asks of offsets, lengths and buffers (512 on some disks; 4096 suits both).
ALIGN = 4096


def write_all(fd: int, data: bytes | memoryview, offset: int) -> None:
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


class FileOutput:
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
                write_all(self.direct_fd, data[:direct], offset)
                self.direct_bytes += direct
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                # Accepted when opened, refused when written (some network filesystems).
                log.info("O_DIRECT refused writing a download; writing through the page cache")
                self.direct_fd, direct = -1, 0
        if direct < len(data):
            write_all(self.fd, data[direct:], offset + direct)

    def close(self) -> None:
        os.close(self.fd)
        if self.direct_fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.direct_fd)


class Buffers:
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


class StreamingHash:
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
