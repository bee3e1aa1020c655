"""Ranged GETs into the downloader's buffers, against real sockets that misbehave on purpose."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from nodeagent.store import StoreError
from nodeagent.store.base import http_status_error
from nodeagent.store.ranges import read_into

BODY = bytes(range(256)) * 4096  # 1 MiB
Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def server(handler: Handler) -> AsyncIterator[tuple[str, list[int]]]:
    """A TCP server on a free port; yields its URL and the count of connections it took."""
    connections: list[int] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        try:
            await handler(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    listener = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    async with listener:
        yield f"http://127.0.0.1:{port}/blob?sig=x", connections


async def request_range(reader: asyncio.StreamReader) -> tuple[int, int]:
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    line = next(line for line in head.split("\r\n") if line.lower().startswith("range:"))
    start, end = line.split("=", 1)[1].split("-")
    return int(start), int(end) + 1


def answer(body: bytes, status: str = "206 Partial Content", length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    return f"HTTP/1.1 {status}\r\nContent-Length: {size}\r\n\r\n".encode() + body


async def fetch(url: str, start: int, end: int, seen: list[int] | None = None) -> bytearray:
    buffer = bytearray(end - start)
    await read_into(
        url,
        {"Range": f"bytes={start}-{end - 1}"},
        memoryview(buffer),
        "blob",
        lambda status, body: http_status_error(status, "blob", body),
        (seen if seen is not None else []).append,
    )
    return buffer


async def test_a_range_is_read_into_the_buffer_and_the_connection_kept_alive():
    async def handler(reader, writer):
        while True:
            start, end = await request_range(reader)
            writer.write(answer(BODY[start:end]))
            await writer.drain()

    async with server(handler) as (url, connections):
        seen: list[int] = []
        assert await fetch(url, 0, len(BODY), seen) == BODY
        assert sum(seen) == len(BODY)
        assert await fetch(url, 1000, 300_000) == BODY[1000:300_000]
        assert await fetch(url, 5, 6) == BODY[5:6]
        assert len(connections) == 1  # three ranges, one connection


async def test_a_kept_alive_connection_the_server_closed_is_replaced_without_an_error():
    # As a store that drops idle connections without saying so (no `Connection: close`).
    async def handler(reader, writer):
        start, end = await request_range(reader)
        writer.write(answer(BODY[start:end]))
        await writer.drain()

    async with server(handler) as (url, connections):
        assert await fetch(url, 0, 4096) == BODY[:4096]
        await asyncio.sleep(0.05)  # the server has closed its end by now
        assert await fetch(url, 4096, 8192) == BODY[4096:8192]
        assert len(connections) == 2


async def test_a_cancelled_read_stops_at_once_and_leaves_the_buffer_alone():
    sent = asyncio.Event()

    async def handler(reader, writer):
        start, end = await request_range(reader)
        writer.write(answer(BODY[start : start + 1000], length=end - start))
        await writer.drain()
        sent.set()
        await asyncio.sleep(60)  # a store that stalls mid-body

    async with server(handler) as (url, _):
        buffer = bytearray(len(BODY))
        seen: list[int] = []
        read = asyncio.create_task(
            read_into(
                url, {"Range": f"bytes=0-{len(BODY) - 1}"}, memoryview(buffer), "blob",
                lambda status, body: http_status_error(status, "blob", body), seen.append,
            )
        )  # fmt: skip
        await sent.wait()
        while not seen:  # noqa: ASYNC110 - the first bytes are in the buffer
            await asyncio.sleep(0.01)
        cancelled = time.monotonic()
        read.cancel()
        with pytest.raises(asyncio.CancelledError):
            await read
        # The socket was shut down, not left to its 30 s timeout; and once the
        # cancellation is through, no thread writes into the buffer any more.
        assert time.monotonic() - cancelled < 5
        assert buffer[:1000] == BODY[:1000]
        assert not any(buffer[1000:])


@pytest.mark.parametrize(
    ("reply", "code", "retryable"),
    [
        (b"garbage, not HTTP\r\n\r\n", "store_unreachable", True),
        (answer(b"x" * 10, length=4096), "short_read", True),  # closes after 10 of 4096
        (answer(b"x" * 10), "short_read", True),  # a 206 of the wrong size
        (answer(b"<Error>busy</Error>", "503 Server Busy"), "store_unavailable", True),
        (answer(b"<Error>no</Error>", "403 Forbidden"), "access_denied", False),
        (answer(b"", "412 Precondition Failed"), "blob_changed", False),
        (b"HTTP/1.1 206 Partial Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
         "short_read", True),
    ],
)  # fmt: skip
async def test_a_peer_that_answers_wrongly_gets_a_clear_store_error(reply, code, retryable):
    async def handler(reader, writer):
        await request_range(reader)
        writer.write(reply)
        await writer.drain()

    async with server(handler) as (url, _):
        with pytest.raises(StoreError) as raised:
            await fetch(url, 0, 4096)
    assert (raised.value.code, raised.value.retryable) == (code, retryable)


async def test_a_store_that_never_answers_is_unreachable():
    async with server(lambda reader, writer: asyncio.sleep(0)) as (url, _):
        with pytest.raises(StoreError) as raised:
            await fetch(url, 0, 4096)
    assert raised.value.code == "store_unreachable"
