"""uvicorn's HTTP protocol (httptools), sending a response's head with the start of its body.

uvicorn writes a response's status line and headers to the socket as soon as the
application sends `http.response.start`, and its body with the next message: two
`send` calls on the connection, and on loopback or a LAN two wake-ups of the client
for one answer. Nearly every /v1 answer is one JSON body that follows its head in
the same turn of the event loop, so the head waits for it: `HeadWithBody` holds a
write that begins a response until the next write (joined into one) or the end of
the loop's turn (`call_soon`), whichever comes first. Nothing waits longer than that
turn: a stream's head goes out as it did when its first event is not ready yet, and
a connection that closes sends what it holds first. bench/README.md (the warm path)
has what it saves per request.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Joined into one buffer below this size; past it, written as a vector (no copy of a body).
_JOIN_BELOW = 16 * 1024


class HeadWithBody(asyncio.Transport):
    """A connection's transport whose response heads leave with the next write (see above)."""

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._transport = transport
        self._loop = loop
        self._held: bytes | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        held = self._held
        if held is not None:
            self._held = None
            if len(data) < _JOIN_BELOW:
                self._transport.write(held + bytes(data))
            else:
                self._transport.writelines((held, data))
        elif data[:5] == b"HTTP/":  # a status line: what uvicorn writes first for a response
            self._held = bytes(data)
            self._loop.call_soon(self.flush)
        else:
            self._transport.write(data)

    def flush(self) -> None:
        """What is held, sent now (the end of the loop's turn, or before anything else)."""
        held, self._held = self._held, None
        if held is not None and not self._transport.is_closing():
            self._transport.write(held)

    def writelines(self, list_of_data: Any) -> None:
        self.flush()
        self._transport.writelines(list_of_data)

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._held = None
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + len(self._held or b"")

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `HeadWithBody` transport."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(HeadWithBody(transport, self.loop))
