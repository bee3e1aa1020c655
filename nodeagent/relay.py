"""The inference proxy's hop to its engine: one HTTP/1.1 exchange on a loopback connection kept
for the next, and the answer's body written to the client's connection as its bytes arrive.

aiohttp's client would parse each chunk of a stream out of its chunked framing, queue it, wake
the proxy's task for it, and aiohttp's server would frame it again: per streamed token, a task
switch and three copies. Here the engine's bytes are written on from the protocol callback that
receives them, framing and all: the chunked framing is followed, to know where the answer ends,
but not rebuilt. The proxy's task wakes only when the client's connection pushes back or the
answer ends (bench/README.md, the warm path).

Faults keep their meaning for the proxy: an engine that does not answer, or closes before its
status line, is `EngineUnreachable` (nothing was relayed: the gateway may try another replica);
one whose answer breaks off or turns to garbage after the status line is `StreamBroken` (the
client's connection is then cut where it broke, as HTTP says a short answer must be).

This module is one connection's exchange (`EngineConnection`); the pool that keeps
connections between exchanges is nodeagent.enginepool, and the reading of a status
line, headers and chunk sizes nodeagent.http1.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import cast

from aiohttp import web

from nodeagent.http1 import (
    CRLF,
    MAX_HEAD,
    MAX_SIZE_LINE,
    Head,
    chunk_size,
    failed_as_stale,
    take_head,
)

# How the body's bytes go to the client: as they are; a chunked body's data without its
# framing; a body framed by the close, given chunked framing.
_PASS, _DECHUNK, _FRAME = "pass", "dechunk", "frame"


class EngineUnreachable(Exception):
    """No answer from the engine: it refused, closed, or said nothing HTTP."""


class StreamBroken(Exception):
    """The engine's answer broke off after its status line."""


@dataclass
class _Chunks:
    """Where the reader is in a chunked body."""

    remaining: int = 0  # bytes left of the current chunk, its closing CRLF included
    held: bytes = b""  # a size line cut by a read, held back until it is whole
    crlf: bytes = b""  # the current chunk's closing CRLF so far
    trailer: bytes | None = None  # set once the last chunk is seen: the trailer so far


class EngineConnection(asyncio.Protocol):
    """One connection to an engine: an exchange at a time, then kept for the next."""

    def __init__(self, key: tuple[str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.exchanges = 0  # begun on this connection
        self.idle_since = 0.0  # when it was last kept (give_back)
        # The exchange under way.
        self._method = "GET"
        self._head_buffer = bytearray()
        self._head: asyncio.Future[Head] | None = None
        self._framing: Head | None = None
        self._received = 0  # bytes of this exchange's answer
        self._remaining = 0  # of a declared length
        self._chunks = _Chunks()
        self._early: list[bytes] = []  # body bytes that came before the relay started
        self._sink: asyncio.Transport | None = None
        self._sink_protocol: object = None
        self._mode = _PASS
        self._waiter: asyncio.Future[None] | None = None
        self._complete = False
        self._error: BaseException | None = None
        self._paused = False
        self._lost: tuple[Exception | None] | None = None  # a close before the relay began
        self._sent_at = 0.0

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # (uvloop's transports are no subclasses of asyncio's, only alike)
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._head is not None and not self._head.done():
            self._read_head(data)
        elif self._framing is not None and not self._complete:
            if self._sink is None:
                self._early.append(data)
            else:
                self._body(data)
        else:  # nothing was asked: an engine that talks out of turn is not kept
            self._close()

    def eof_received(self) -> bool:
        return False  # close: an engine half-closing is done with this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self._head is not None and not self._head.done():
            self._head.set_exception(
                EngineUnreachable(f"the engine closed the connection{_because(exc)}")
            )
        elif self._framing is not None and not self._complete:
            if self._sink is None:  # the bytes before it are not relayed yet: they come first
                self._lost = (exc,)
            else:
                self._ended(exc)

    def _ended(self, exc: Exception | None) -> None:
        """The engine closed the connection with the answer not yet complete."""
        framing = self._framing
        assert framing is not None
        if framing.length is None and not framing.chunked and exc is None:
            self._finish()  # an answer framed by the close ends with it
        else:
            self._fail(StreamBroken(f"the engine's answer broke off{_because(exc)}"))

    # -- the exchange --------------------------------------------------------------------

    def send(self, method: str, target: str, headers: Mapping[str, str], body: bytes) -> None:
        assert self.transport is not None
        self.exchanges += 1
        self._method = method
        self._head = asyncio.get_running_loop().create_future()
        self._head_buffer.clear()
        self._framing, self._sink, self._waiter, self._error = None, None, None, None
        self._complete, self._paused, self._early, self._received = False, False, [], 0
        self._chunks, self._lost, self._sent_at = _Chunks(), None, time.monotonic()
        host, port = self.key
        lines = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        lines.append(f"Content-Length: {len(body)}")
        # (aiohttp decoded the client's header bytes as UTF-8 with surrogateescape: the same
        # bytes go on)
        head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
        self.transport.write(head + b"\r\n\r\n" + body)

    async def head(self) -> Head:
        assert self._head is not None
        return await self._head

    async def relay(self, request: web.Request, chunked_out: bool) -> None:
        """Write the answer's body to `request`'s connection as it arrives, until it ends.
        `chunked_out`: the answer to the client is chunked (its headers are sent), and its last
        chunk's marker is left to the caller's `write_eof`. Raises StreamBroken, or
        ConnectionResetError when the client went away."""
        sink = request.transport
        if sink is None or sink.is_closing():
            self._close()
            raise ConnectionResetError("the client went away")
        framing = self._framing
        assert framing is not None
        if framing.chunked:
            # As it is to a chunked answer; its data alone to an HTTP/1.0 client.
            self._mode = _PASS if chunked_out else _DECHUNK
        else:
            # A declared length goes as it is; a body framed by the close, framed to a chunked
            # answer.
            self._mode = _FRAME if chunked_out and framing.length is None else _PASS
        self._sink, self._sink_protocol = sink, request.protocol
        early, self._early = self._early, []
        for data in early:
            if self._complete or self._error is not None:
                break
            self._body(data)
        if self._lost is not None and not self._complete and self._error is None:
            self._ended(self._lost[0])  # the engine closed before the relay began
        loop = asyncio.get_running_loop()
        try:
            while not self._complete:
                if self._error is not None:
                    raise self._error
                if self._paused:
                    await request.writer.drain()  # the client's connection takes more again
                    self._paused = False
                    if self.transport is not None:
                        self.transport.resume_reading()
                    continue
                self._waiter = loop.create_future()
                await self._waiter
        finally:
            self._waiter = None
            self._sink = None
            if not self._complete:
                self._close()  # the engine aborts a request whose connection closes

    @property
    def stale(self) -> bool:
        """Whether this exchange failed as one on a kept connection that its engine had closed
        does: at once, and before a byte of an answer. Only then is it sure the engine did not
        work on the request, and it may be sent again."""
        return failed_as_stale(self.exchanges, self._received, self._sent_at)

    @property
    def closed(self) -> bool:
        """Closed, or closing: by the engine (`connection_lost`) or by this side (`_close`)."""
        return self.transport is None or self.transport.is_closing()

    @property
    def reusable(self) -> bool:
        framing = self._framing
        return self._complete and not self.closed and framing is not None and framing.keep_alive

    def abandon(self) -> None:
        """The exchange is not relayed (a dead engine's answer): the connection is not kept."""
        self._close()

    # -- reading ---------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        self._head_buffer += data
        try:
            taken = take_head(self._head_buffer, self._method)
        except ValueError as exc:
            self._bad_head(str(exc))
            return
        if taken is None:
            return
        head, rest = taken
        self._framing = head
        self._remaining = head.length or 0
        assert self._head is not None
        self._head.set_result(head)
        if not head.body or head.length == 0:
            self._finish()
            if rest:
                self._close()  # bytes past the answer: not a connection to keep
        elif rest:
            self._early.append(rest)

    def _bad_head(self, why: str) -> None:
        assert self._head is not None
        self._head.set_exception(EngineUnreachable(f"the engine did not answer HTTP: {why}"))
        self._close()

    def _body(self, data: bytes) -> None:
        framing = self._framing
        assert framing is not None
        assert self._sink is not None
        if self._sink.is_closing():  # the client is gone: so is the engine's request
            self._fail(ConnectionResetError("the client went away"))
            return
        if framing.chunked:
            self._chunked(data)
        elif framing.length is not None:
            if len(data) > self._remaining:
                self._fail(StreamBroken("the engine sent more than the length it declared"))
                return
            self._remaining -= len(data)
            self._write(data)
            if not self._remaining:
                self._finish()
        else:
            self._write(data)
        if not self._complete and getattr(self._sink_protocol, "writing_paused", False):
            # The client reads slower than the engine writes: stop reading the engine until
            # the client's connection drains (the relay's task waits for it).
            self._paused = True
            if self.transport is not None:
                self.transport.pause_reading()
            self._wake()

    def _chunked(self, data: bytes) -> None:
        """Pass a chunked body's bytes on as they are (or their data alone), up to its last
        chunk, reading the framing where a chunk ends. The framing is checked as strictly as
        HTTP has it (hex sizes, CRLFs), since the client's parser reads the same bytes."""
        chunks = self._chunks
        if chunks.trailer is not None:
            self._trailer(data)
            return
        if chunks.held:
            data, chunks.held = chunks.held + data, b""
        position, size_of = 0, len(data)
        out: list[bytes] | None = [] if self._mode == _DECHUNK else None
        while position < size_of:
            if chunks.remaining:  # inside a chunk: its data, then its CRLF
                step = min(chunks.remaining, size_of - position)
                data_left = max(chunks.remaining - 2, 0)
                if out is not None:
                    out.append(data[position : position + min(step, data_left)])
                if step > data_left:  # (some of) the closing CRLF, perhaps cut by a read
                    chunks.crlf += data[position + data_left : position + step]
                position += step
                chunks.remaining -= step
                if not chunks.remaining:
                    if chunks.crlf != CRLF:
                        self._fail(StreamBroken("the engine's chunked framing is broken"))
                        return
                    chunks.crlf = b""
                continue
            newline = data.find(b"\n", position)
            if newline < 0:  # a size line cut by the read: held back until it is whole
                if size_of - position > MAX_SIZE_LINE:
                    self._fail(StreamBroken("the engine's chunked framing is broken"))
                    return
                chunks.held = data[position:]
                self._pass(data[:position], out)
                return
            size = chunk_size(data[position : newline + 1])
            if size is None:
                self._fail(StreamBroken("the engine's chunked framing is broken"))
                return
            if size == 0:  # the last chunk: its marker is the caller's write_eof
                self._pass(data[:position], out)
                chunks.trailer = b""
                self._trailer(data[newline + 1 :])
                return
            chunks.remaining = size + 2
            position = newline + 1
        self._pass(data, out)

    def _pass(self, data: bytes, out: list[bytes] | None) -> None:
        if out is None:
            if data:
                self._write(data)
        elif out:
            self._write(b"".join(out))

    def _trailer(self, data: bytes) -> None:
        chunks = self._chunks
        assert chunks.trailer is not None
        trailer = chunks.trailer + data
        # The trailer section ends with an empty line: at once (no trailers), or after them.
        if trailer.startswith(b"\r\n") or b"\r\n\r\n" in trailer:
            end = 2 if trailer.startswith(b"\r\n") else trailer.index(b"\r\n\r\n") + 4
            self._finish()
            if trailer[end:]:
                self._close()
            return
        if len(trailer) > MAX_HEAD:
            self._fail(StreamBroken("the engine's trailer is over 64 KiB"))
            return
        chunks.trailer = trailer

    def _write(self, data: bytes) -> None:
        assert self._sink is not None
        if self._mode == _FRAME:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        self._sink.write(data)

    def _finish(self) -> None:
        self._complete = True
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._close()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def _because(exc: Exception | None) -> str:
    return f": {exc}" if exc else ""
