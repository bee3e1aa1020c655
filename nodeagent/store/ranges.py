"""Ranged HTTP GETs read straight into the caller's buffer, in worker threads.

Why not aiohttp for the bytes: its reads hand out a new `bytes` per socket read and join
them, so every byte is copied twice in user space, into memory that is new each time; on
these VMs touching fresh pages costs about as much CPU as the copy. Here `recv_into` fills
the downloader's reused buffer directly (`http.client`'s `readinto` on a raw socket file),
with the GIL released while the kernel copies. Connections are kept alive per endpoint
and reused across ranges and downloads. Listings and small reads stay on aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from nodeagent.store.base import StoreError, thread_to_end

CONNECT_TIMEOUT = 5.0
READ_TIMEOUT = 30.0  # a socket that sends nothing for this long is broken
_STEP = 4 * 1024 * 1024  # progress is reported after each step
_IDLE_LIMIT = 64  # kept-alive connections per endpoint
_IDLE_SECONDS = 50.0  # below the 60 s after which stores (and load balancers) drop idle ones
_THREADS = 32

# An answer that is not the range: its status and the first bytes of its body.
StatusError = Callable[[int, str], StoreError]


class _Pool:
    """Idle keep-alive connections, per (scheme, host, port)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.idle: dict[tuple[str, str, int], list[tuple[float, http.client.HTTPConnection]]] = {}
        self.context: ssl.SSLContext | None = None

    def take(self, key: tuple[str, str, int]) -> tuple[http.client.HTTPConnection, bool]:
        """A connection to the endpoint, and whether it was used before."""
        now = time.monotonic()
        with self.lock:
            idle = self.idle.get(key, [])
            while idle:
                since, connection = idle.pop()
                if now - since < _IDLE_SECONDS:
                    return connection, True
                connection.close()
            scheme, host, port = key
            if scheme == "https":
                if self.context is None:
                    self.context = ssl.create_default_context()
                return http.client.HTTPSConnection(
                    host, port, timeout=CONNECT_TIMEOUT, context=self.context
                ), False
        return http.client.HTTPConnection(host, port, timeout=CONNECT_TIMEOUT), False

    def give(self, key: tuple[str, str, int], connection: http.client.HTTPConnection) -> None:
        with self.lock:
            idle = self.idle.setdefault(key, [])
            if len(idle) < _IDLE_LIMIT:
                idle.append((time.monotonic(), connection))
                return
        connection.close()


_pool = _Pool()
_executor = ThreadPoolExecutor(max_workers=_THREADS, thread_name_prefix="llmfleet-range")


class _Abort:
    """Lets the event loop stop a read that a thread is blocked in."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.aborted = False
        self.sock: socket.socket | None = None

    def watch(self, sock: socket.socket | None) -> None:
        with self.lock:
            self.sock = sock
            if self.aborted:
                self._shutdown()

    def abort(self) -> None:
        with self.lock:
            self.aborted = True
            self._shutdown()

    def _shutdown(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)


def _set_timeouts(sock: socket.socket) -> None:
    """Blocking, with the kernel's timeouts rather than Python's: MSG_WAITALL needs a
    blocking socket, and a recv that waits is then one syscall, not a poll and a recv."""
    if isinstance(sock, ssl.SSLSocket):
        sock.settimeout(READ_TIMEOUT)  # TLS reads take no flags: Python's timeout it is
        return
    sock.settimeout(None)
    timeval = struct.pack("ll", int(READ_TIMEOUT), 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)


def _read_body(
    response: http.client.HTTPResponse,
    sock: socket.socket,
    buffer: memoryview,
    on_bytes: Callable[[int], None],
    what: str,
) -> None:
    """All of the body into `buffer`: what http.client buffered with the headers, then
    straight from the socket, a step per syscall (MSG_WAITALL: the kernel fills the step
    before the thread wakes, so the GIL is taken once per step, not once per packet)."""
    received = 0
    if buffer:
        assert response.fp is not None
        first = response.fp.read1(len(buffer))
        buffer[: len(first)] = first
        received = len(first)
        on_bytes(received)
    flags = 0 if isinstance(sock, ssl.SSLSocket) else socket.MSG_WAITALL
    while received < len(buffer):
        step = min(_STEP, len(buffer) - received)
        count = sock.recv_into(buffer[received : received + step], step, flags)
        if not count:
            raise StoreError(
                "short_read", f"{what}: got {received} of {len(buffer)} bytes", 503, True
            )
        received += count
        on_bytes(count)


def _read(
    url: str,
    headers: Mapping[str, str],
    buffer: memoryview,
    what: str,
    status_error: StatusError,
    on_bytes: Callable[[int], None],
    abort: _Abort,
) -> None:
    parts = urlsplit(url)
    scheme = parts.scheme
    port = parts.port or (443 if scheme == "https" else 80)
    key = (scheme, parts.hostname or "", port)
    target = parts.path + (f"?{parts.query}" if parts.query else "")
    while True:
        connection, reused = _pool.take(key)
        try:
            if connection.sock is None:
                connection.connect()
            sock: socket.socket = connection.sock
            if not reused:
                _set_timeouts(sock)
            abort.watch(sock)
            connection.request("GET", target, headers=dict(headers))
            response = connection.getresponse()
        except (OSError, http.client.HTTPException) as exc:
            connection.close()
            if reused and not abort.aborted:
                continue  # a kept-alive connection the server had closed: once more, anew
            raise StoreError("store_unreachable", f"reading {what}: {exc!r}", 503, True) from None
        try:
            if response.status not in (200, 206):
                body = response.read(4096).decode(errors="replace")
                raise status_error(response.status, body)
            length = response.getheader("Content-Length")
            if response.chunked or length is None or int(length) != len(buffer):
                raise StoreError(
                    "short_read",
                    f"{what}: the store sent {length or 'unsized'} of {len(buffer)} bytes",
                    503, True,
                )  # fmt: skip
            _read_body(response, sock, buffer, on_bytes, what)
            abort.watch(None)
            response.close()  # the body is all read: the connection is at the next answer
            if not response.will_close:
                _pool.give(key, connection)
                connection = None  # type: ignore[assignment]
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise StoreError("store_unreachable", f"reading {what}: {exc!r}", 503, True) from None
        finally:
            if connection is not None:
                connection.close()
        return


async def read_into(
    url: str,
    headers: Mapping[str, str],
    buffer: memoryview,
    what: str,
    status_error: StatusError,
    on_bytes: Callable[[int], None],
) -> None:
    """GET `url` (a ranged request, by its headers) into all of `buffer`; StoreError if the
    answer is not exactly that many bytes. `on_bytes` is called in the loop as bytes arrive.

    When cancelled, the read is stopped (its socket shut down) and awaited before the
    cancellation goes on: the caller may reuse the buffer as soon as this returns.
    """
    loop = asyncio.get_running_loop()
    abort = _Abort()

    def progress(count: int) -> None:
        loop.call_soon_threadsafe(on_bytes, count)

    await thread_to_end(
        _read, url, headers, buffer, what, status_error, progress, abort,
        executor=_executor, on_cancel=abort.abort,
    )  # fmt: skip
