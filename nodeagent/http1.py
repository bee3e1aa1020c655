"""Reading HTTP/1.1 as an engine writes it: a status line with its headers, and the
framing of its body (a declared length, chunks, or the connection's close).

Strict where the client's parser will read the same bytes (hex chunk sizes, CRLFs,
header lines), and bounded (MAX_HEAD, MAX_SIZE_LINE) so that an engine that says
nothing HTTP cannot make the agent buffer without end. nodeagent.relay reads the
engine's connection with these; the web process reads its agents' answers with them too
(controlplane.gateway.agenthttp), a chunked stream de-chunked by `Dechunker`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from multidict import CIMultiDict

MAX_HEAD = 64 * 1024  # an engine's status line and headers
MAX_SIZE_LINE = 1024  # a chunk's size line (extensions included)
_NO_BODY = {204, 304}
CRLF = b"\r\n"


@dataclass
class Head:
    """An answer's status line and headers, and how its body is framed."""

    status: int
    reason: str
    headers: CIMultiDict[str]
    length: int | None = None  # the body's declared length; None: chunked or to the close
    chunked: bool = False
    keep_alive: bool = True
    body: bool = True  # False for HEAD, 1xx, 204 and 304


_HEX = frozenset(b"0123456789abcdefABCDEF")


def chunk_size(line: bytes) -> int | None:
    """A chunk's size from its line (`1a;ext=v\\r\\n`), or None when it is not one."""
    if not line.endswith(CRLF) or len(line) > MAX_SIZE_LINE:
        return None
    digits = line[:-2].split(b";", 1)[0]
    if not digits or not _HEX.issuperset(digits):
        return None
    return int(digits, 16)


def parse_head(raw: bytes, method: str) -> Head:
    """The answer to `method` from its status line and headers (`raw`, without the empty
    line that ends them); ValueError when they are not HTTP/1.x."""
    lines = raw.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code, _, reason = rest.partition(" ")
    if not version.startswith("HTTP/1.") or len(code) != 3 or not code.isdigit():
        raise ValueError(f"a status line of {lines[0][:80]!r}")
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, colon, value = line.partition(":")
        if not colon or not name or name != name.strip():
            raise ValueError(f"a header line of {line[:80]!r}")
        headers.add(name, value.strip())
    status = int(code)
    connection = headers.get("connection", "").lower()
    head = Head(status, reason, headers)
    head.keep_alive = version == "HTTP/1.1" and "close" not in connection
    head.body = method != "HEAD" and status not in _NO_BODY and status >= 200
    if "chunked" in headers.get("transfer-encoding", "").lower():
        head.chunked = True
    elif "content-length" in headers:
        declared = headers["content-length"].strip()
        if not declared.isdigit():
            raise ValueError(f"a Content-Length of {declared[:40]!r}")
        head.length = int(declared)
    elif head.body:
        head.keep_alive = False  # framed by the close
    if not head.body:
        head.length = 0
    return head


# A kept connection that fails this soon after a request went out on it, before a byte of an
# answer, was closed by its server before the request arrived (its keep-alive ran out).
STALE_SECONDS = 0.1


def failed_as_stale(exchanges: int, received: int, sent_at: float) -> bool:
    """Whether an exchange failed as one on a kept connection that its server had closed does:
    on a connection used before, at once, and before a byte of an answer. Only then is it sure
    the server did not work on the request, and it may be sent again on a new connection.
    (`sent_at`: time.monotonic() as the request went out.)"""
    return exchanges > 1 and not received and time.monotonic() - sent_at < STALE_SECONDS


def take_head(buffer: bytearray, method: str) -> tuple[Head, bytes] | None:
    """The answer's head once `buffer` holds it whole, interim (1xx) answers skipped, and the
    bytes that came after it (`buffer` is then emptied); None while it is not whole.
    ValueError when it is not HTTP/1.x, or over MAX_HEAD."""
    while True:
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > MAX_HEAD:
                raise ValueError("a status line and headers over 64 KiB")
            return None
        head = parse_head(bytes(buffer[:end]), method)
        rest = bytes(buffer[end + 4 :])
        buffer.clear()
        if 100 <= head.status < 200:  # an interim answer: the real one follows
            buffer += rest
            continue
        return head, rest


class Dechunker:
    """A chunked body's data from its framing, as the bytes arrive, bounded as a head is
    (the web process's client to its agents reads their streams with it)."""

    _SIZE, _DATA, _CRLF, _TRAILER = range(4)

    def __init__(self) -> None:
        self.state = self._SIZE
        self.remaining = 0  # of the current chunk's data
        self.pending = b""  # framing cut by a read, held until it is whole
        self.trailer = 0  # bytes of trailer seen
        self.done = False
        self.extra = False  # bytes came past the answer's end

    def feed(self, data: bytes) -> list[bytes]:
        """The data in `data`; ValueError when the framing is not HTTP's."""
        if self.pending:
            data, self.pending = self.pending + data, b""
        out: list[bytes] = []
        position, end = 0, len(data)
        while position < end and not self.done:
            if self.state == self._DATA:
                step = min(self.remaining, end - position)
                out.append(data[position : position + step])
                position += step
                self.remaining -= step
                if not self.remaining:
                    self.state = self._CRLF
                continue
            if self.state == self._CRLF:
                if end - position < 2:
                    break
                if data[position : position + 2] != CRLF:
                    raise ValueError("a chunk without its closing CRLF")
                position += 2
                self.state = self._SIZE
                continue
            newline = data.find(b"\n", position)
            if newline < 0:
                if end - position > MAX_SIZE_LINE:
                    raise ValueError("a chunk size or trailer line over 1 KiB")
                break
            line = data[position : newline + 1]
            position = newline + 1
            if self.state == self._SIZE:
                size = chunk_size(line)
                if size is None:
                    raise ValueError(f"a chunk size line of {line[:40]!r}")
                self.state, self.remaining = (self._TRAILER, 0) if size == 0 else (self._DATA, size)
            elif line == CRLF:
                self.done = True
            else:
                self.trailer += len(line)
                if not line.endswith(CRLF) or self.trailer > MAX_HEAD:
                    raise ValueError("a trailer that is not HTTP's")
        if self.done:
            self.extra = position < end
        else:
            self.pending = data[position:]
        return out
