"""The web process's HTTP/1.1 client to the node agents: one exchange at a time on a connection
kept for the next, its answer read from the protocol's callback.

aiohttp's client cost the warm path a request object, a response object, a stream reader, a
timer per read and (on Python 3.11) a task for each request's body: more CPU per request than
the rest of the gateway's own work, on the path every answer takes (bench/README.md, the warm
path). Here a request is one write of its head and body, and its answer is read where its
bytes arrive: a plain answer's body gathered until it is whole, a stream's handed to the relay
as it comes, de-chunked, as many bytes at a time as have arrived.

Faults keep the meaning routing gives them: no connection, or an agent that closes or says
nothing HTTP before its status line, is `AgentUnreachable` (nothing came back: another replica
may serve); an answer that breaks off, or a stream silent past its idle limit, after the status
line is `AnswerBroken` (the client has heard the status: its answer ends with an error).

The agent's answers are read as nodeagent.http1 reads an engine's (the same bounds on a
status line, headers and chunk sizes), their chunked streams by its `Dechunker`.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from urllib.parse import quote, urlsplit

from multidict import CIMultiDict

from nodeagent.enginepool import PATH_SAFE, Kept
from nodeagent.http1 import Dechunker, Head, failed_as_stale, take_head

# How long a kept connection may sit idle before it is used again: well under the agent's own
# keep-alive (aiohttp's server, 75 s), so a kept connection is not one the agent is closing.
KEEP_IDLE_SECONDS = 15.0
KEEP_PER_AGENT = 256
# A stream's bytes not yet taken by the relay, past which the agent's connection is not read
# (a client slower than its engine): TCP's window then slows the agent, and so the engine.
_HIGH_WATER = 256 * 1024


class AgentUnreachable(Exception):
    """No answer from the agent: no connection, or a close or garbage before the status line."""


class AnswerBroken(Exception):
    """The agent's answer broke off after its status line (or a stream fell silent)."""


class AgentConnection(asyncio.Protocol):
    """One connection to an agent: an exchange at a time, then kept for the next."""

    def __init__(self, key: tuple[str, str, int]) -> None:
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.exchanges = 0
        self.idle_since = 0.0
        self._loop = asyncio.get_running_loop()  # made by create_connection, on the loop
        self._new_exchange()

    def _new_exchange(self) -> None:
        self._head_buffer = bytearray()
        self._head: asyncio.Future[Head] | None = None
        self.head: Head | None = None
        self._remaining = 0  # of a declared length
        self._dechunker: Dechunker | None = None
        self._data: list[bytes] = []
        self._buffered = 0
        self._waiter: asyncio.Future[None] | None = None
        self.complete = False
        self._error: BaseException | None = None
        self._paused = False
        self._streaming = False  # read by `chunks`: its back-pressure applies
        self._received = 0
        self._sent_at = 0.0
        self._idle: float | None = None  # a stream's limit on silence, seconds
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # (uvloop's are alike, not subclasses)

    def data_received(self, data: bytes) -> None:
        self._received += len(data)
        if self._idle is not None:
            self._last_read = self._loop.time()
        if self._head is not None and not self._head.done():
            self._read_head(data)
        elif self.head is not None and not self.complete and self._error is None:
            self._body(data)
        else:  # nothing was asked: an agent that talks out of turn is not kept
            self.abandon()

    def eof_received(self) -> bool:
        return False  # close: an agent half-closing is done with this connection

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        because = f": {exc}" if exc else ""
        if self._head is not None and not self._head.done():
            self._head.set_exception(AgentUnreachable(f"the agent closed the connection{because}"))
        elif self.head is not None and not self.complete and self._error is None:
            if self.head.length is None and not self.head.chunked and exc is None:
                self._finish()  # an answer framed by the close ends with it
            else:
                self._fail(AnswerBroken(f"the agent's answer broke off{because}"))

    # -- the exchange --------------------------------------------------------------------

    def send(
        self, target: str, host: str, headers: Mapping[str, str], body: bytes, idle: float | None
    ) -> asyncio.Future[Head]:
        """Write a POST of `body`; the future of its answer's head. `idle`: a stream's limit on
        silence between its reads."""
        assert self.transport is not None
        self._new_exchange()
        self.exchanges += 1
        self._head = self._loop.create_future()
        self._sent_at = time.monotonic()
        lines = [f"POST {target} HTTP/1.1", f"Host: {host}"]
        for name, value in headers.items():
            if "\n" in value or "\r" in value:  # a header of its own: never sent
                raise ValueError(f"a line break in the {name} header")
            lines.append(f"{name}: {value}")
        lines.append(f"Content-Length: {len(body)}\r\n\r\n")
        self.transport.write("\r\n".join(lines).encode() + body)
        if idle is not None:
            self._idle, self._last_read = idle, self._loop.time()
            self._timer = self._loop.call_later(idle, self._check_idle)
        return self._head

    async def read(self) -> bytes:
        """The whole body."""
        while not self.complete or self._error is not None:
            await self._wait()
        data, self._data = self._data, []
        return b"".join(data)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives: whatever has come since the last step, joined. Past
        _HIGH_WATER not yet taken, the connection is not read until it is."""
        self._streaming = True
        while True:
            if self._data:
                data, self._data, self._buffered = self._data, [], 0
                if self._paused and self.transport is not None:
                    self._paused = False
                    self._last_read = self._loop.time()  # its silence starts now
                    self.transport.resume_reading()
                yield data[0] if len(data) == 1 else b"".join(data)
            elif self._error is not None:
                raise self._error
            elif self.complete:
                return
            else:
                await self._wait()

    async def _wait(self) -> None:
        if self._error is not None:
            raise self._error
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None
        if self._error is not None and not self._data:
            raise self._error

    @property
    def stale(self) -> bool:
        """Whether the exchange failed as one on a kept connection that its agent had closed
        does: at once, before a byte of an answer. Only then may it be sent again."""
        return failed_as_stale(self.exchanges, self._received, self._sent_at)

    @property
    def closed(self) -> bool:
        return self.transport is None or self.transport.is_closing()

    @property
    def reusable(self) -> bool:
        return (
            self.complete
            and self._error is None
            and not self.closed
            and self.head is not None
            and self.head.keep_alive
        )

    def abandon(self) -> None:
        """Close the connection (the agent cancels the engine's request with it)."""
        self._cancel_timer()
        if self.transport is not None:
            self.transport.close()

    # -- reading ---------------------------------------------------------------------------

    def _read_head(self, data: bytes) -> None:
        self._head_buffer += data
        try:
            taken = take_head(self._head_buffer, "POST")
        except ValueError as exc:
            self._bad_head(str(exc))
            return
        if taken is None:
            return
        head, rest = taken
        self.head = head
        self._remaining = head.length or 0
        if head.chunked:
            self._dechunker = Dechunker()
        assert self._head is not None
        self._head.set_result(head)
        if not head.body or head.length == 0:
            self._finish()
            if rest:
                self.abandon()  # bytes past the answer: not a connection to keep
        elif rest:
            self._body(rest)

    def _bad_head(self, why: str) -> None:
        assert self._head is not None
        self._head.set_exception(AgentUnreachable(f"the agent did not answer HTTP: {why}"))
        self.abandon()

    def _body(self, data: bytes) -> None:
        head = self.head
        assert head is not None
        if self._dechunker is not None:
            try:
                pieces = self._dechunker.feed(data)
            except ValueError as exc:
                self._fail(AnswerBroken(f"the agent's chunked framing is broken: {exc}"))
                return
            for piece in pieces:
                self._keep(piece)
            if self._dechunker.done:
                self._finish()
                if self._dechunker.extra:
                    self.abandon()
        elif head.length is not None:
            if len(data) > self._remaining:
                self._fail(AnswerBroken("the agent sent more than the length it declared"))
                return
            self._remaining -= len(data)
            self._keep(data)
            if not self._remaining:
                self._finish()
        else:
            self._keep(data)
        if self._waiter is not None and not self._waiter.done() and self._data:
            self._waiter.set_result(None)
        if (
            self._streaming
            and self._buffered > _HIGH_WATER
            and not self._paused
            and not self.complete
        ):
            self._paused = True
            if self.transport is not None:
                self.transport.pause_reading()

    def _keep(self, data: bytes) -> None:
        if data:
            self._data.append(data)
            self._buffered += len(data)

    def _check_idle(self) -> None:
        self._timer = None
        if self.complete or self._error is not None or self._idle is None:
            return
        silent = self._loop.time() - self._last_read
        if silent >= self._idle and not self._paused and self.head is not None:
            self._fail(AnswerBroken(f"the stream was silent for {self._idle:.0f} s"))
            return
        # Silent for less, or the relay is behind (nothing is read meanwhile): look again.
        self._timer = self._loop.call_later(max(self._idle - silent, 0.05), self._check_idle)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _finish(self) -> None:
        self.complete = True
        self._cancel_timer()
        self._wake()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self.abandon()
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)


class AgentAnswer:
    """An agent's answer, its head read: its body read whole (`read`) or as it comes
    (`chunks`), then its connection kept (`release`) or closed (`close`), once."""

    def __init__(self, connection: AgentConnection, head: Head, pool: AgentConnections) -> None:
        self._connection = connection
        self._pool = pool
        self.status = head.status
        self.headers: CIMultiDict[str] = head.headers
        self._done = False

    async def read(self) -> bytes:
        return await self._connection.read()

    def chunks(self) -> AsyncIterator[bytes]:
        return self._connection.chunks()

    def release(self) -> None:
        """Done with the answer: its connection kept if the answer was read to its end, closed
        otherwise."""
        if not self._done:
            self._done = True
            self._pool.give_back(self._connection)

    def close(self) -> None:
        """Done with the answer, read or not: its connection closed unless it was released."""
        if not self._done:
            self._done = True
            self._connection.abandon()


@functools.lru_cache(maxsize=1024)
def _address(url: str) -> tuple[tuple[str, str, int], str, str]:
    """(scheme, host, port), the Host header, and the path of an agent's URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise AgentUnreachable(f"not an agent's URL: {url[:100]!r}")
    port = parts.port or (443 if scheme == "https" else 80)
    # As aiohttp sent it: a path's spaces and non-ASCII characters percent-encoded.
    path = quote(parts.path or "/", safe=PATH_SAFE + "%")  # (never twice)
    return (scheme, parts.hostname, port), parts.netloc.rpartition("@")[2], path


class AgentConnections:
    """The web process's connections to its agents, kept between exchanges (one pool per
    agent address); one per event loop (state.GatewayState), closed as the process stops."""

    def __init__(self, connect_seconds: float = 3.0) -> None:
        self.connect_seconds = connect_seconds
        self._kept: Kept[tuple[str, str, int], AgentConnection] = Kept(
            KEEP_IDLE_SECONDS, KEEP_PER_AGENT
        )
        self._tls: ssl.SSLContext | None = None

    async def post(
        self, url: str, headers: Mapping[str, str], body: bytes, idle: float | None = None
    ) -> AgentAnswer:
        """POST `body` to `url`; the answer with its head read. A kept connection the agent
        closed meanwhile is replaced and the request sent again (the agent never saw it).
        AgentUnreachable when there is no answer; cancelling closes the connection."""
        key, host, target = _address(url)
        connection = await self._take(key)
        while True:
            try:
                head = connection.send(target, host, headers, body, idle)
                return AgentAnswer(connection, await head, self)
            except AgentUnreachable:
                if not connection.stale:
                    raise
                connection = await self._take(key, fresh=True)
            except BaseException:
                connection.abandon()
                raise

    def give_back(self, connection: AgentConnection) -> None:
        """Keep a connection whose exchange ended cleanly; close any other."""
        self._kept.give_back(connection)

    async def _take(self, key: tuple[str, str, int], fresh: bool = False) -> AgentConnection:
        if not fresh and (kept := self._kept.take(key)) is not None:
            return kept
        scheme, host, port = key
        tls = None
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context()
            tls = self._tls
        loop = asyncio.get_running_loop()
        try:
            _, protocol = await asyncio.wait_for(
                loop.create_connection(lambda: AgentConnection(key), host, port, ssl=tls),
                self.connect_seconds,
            )
        except (OSError, TimeoutError) as exc:
            text = str(exc) or type(exc).__name__
            raise AgentUnreachable(f"cannot connect to {host}:{port}: {text}") from None
        return protocol

    def close(self) -> None:
        self._kept.close()
