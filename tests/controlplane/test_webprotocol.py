"""The web process's HTTP protocol: a response's head leaves with the start of its body, and
never waits past the event loop's turn."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
import uvicorn

from controlplane.webprotocol import HeadWithBody, HttpProtocol

HEAD = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n"


class Recorded(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, Any]] = []
        self.closing = False

    def write(self, data: Any) -> None:
        self.calls.append(("write", bytes(data)))

    def writelines(self, list_of_data: Any) -> None:
        self.calls.append(("writelines", [bytes(part) for part in list_of_data]))

    def close(self) -> None:
        self.closing = True
        self.calls.append(("close", None))

    def abort(self) -> None:
        self.closing = True
        self.calls.append(("abort", None))

    def is_closing(self) -> bool:
        return self.closing


async def test_a_head_leaves_with_the_body_written_in_the_same_turn():
    inner = Recorded()
    transport = HeadWithBody(inner, asyncio.get_running_loop())
    transport.write(HEAD)
    assert inner.calls == []
    transport.write(b"ok")
    assert inner.calls == [("write", HEAD + b"ok")]
    transport.write(b"more")  # not a head: straight through
    await asyncio.sleep(0)
    assert inner.calls == [("write", HEAD + b"ok"), ("write", b"more")]


async def test_a_head_alone_leaves_at_the_end_of_the_loops_turn():
    inner = Recorded()
    transport = HeadWithBody(inner, asyncio.get_running_loop())
    transport.write(HEAD)  # a stream's head, its first event not ready
    await asyncio.sleep(0)
    assert inner.calls == [("write", HEAD)]
    transport.write(b"data: 1\n\n")
    assert inner.calls[-1] == ("write", b"data: 1\n\n")


async def test_a_large_body_is_written_with_its_head_uncopied_and_close_sends_what_is_held():
    inner = Recorded()
    transport = HeadWithBody(inner, asyncio.get_running_loop())
    body = b"x" * 100_000
    transport.write(HEAD)
    transport.write(body)
    assert inner.calls == [("writelines", [HEAD, body])]
    transport.write(HEAD)
    transport.close()
    assert inner.calls[1:] == [("write", HEAD), ("close", None)]
    await asyncio.sleep(0)
    assert len(inner.calls) == 3  # nothing more at the turn's end


async def test_an_aborted_connection_sends_nothing_it_held():
    inner = Recorded()
    transport = HeadWithBody(inner, asyncio.get_running_loop())
    transport.write(HEAD)
    transport.abort()
    await asyncio.sleep(0)
    assert inner.calls == [("abort", None)]


async def _app(scope: dict, receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["path"] == "/stream":
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})  # fmt: skip
        for event in (b"data: 1\n\n", b"data: 2\n\n"):
            await asyncio.sleep(0.05)  # each event comes later than the head
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body"})
        return
    answer = b"echo:" + body
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(answer)).encode())]})  # fmt: skip
    await send({"type": "http.response.body", "body": answer})


@pytest.fixture
async def server():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(_app, http=HttpProtocol, lifespan="on", log_config=None)
    served = uvicorn.Server(config)
    sock.listen()  # connections wait in the backlog until the server accepts them
    task = asyncio.create_task(served.serve(sockets=[sock]))
    yield sock.getsockname()[1]
    served.should_exit = True
    await task


async def _read_until(reader: asyncio.StreamReader, marker: bytes) -> bytes:
    return await asyncio.wait_for(reader.readuntil(marker), 5)


async def test_answers_keep_alive_heads_and_streams_over_a_real_server(server):
    reader, writer = await asyncio.open_connection("127.0.0.1", server)
    for body in (b"one", b"two"):  # two answers on one kept connection
        writer.write(b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3\r\n\r\n" + body)
        head = await _read_until(reader, b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n")
        assert await asyncio.wait_for(reader.readexactly(8), 5) == b"echo:" + body
    writer.write(b"HEAD /x HTTP/1.1\r\nHost: t\r\n\r\n")  # a head and no body: not held forever
    assert b"content-length: 5" in await _read_until(reader, b"\r\n\r\n")
    # Expect: 100-continue: the interim answer is not held back waiting for the body.
    writer.write(
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n"
    )
    assert await _read_until(reader, b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"hi")
    await _read_until(reader, b"\r\n\r\n")
    assert await asyncio.wait_for(reader.readexactly(7), 5) == b"echo:hi"
    # A stream's head arrives before its first event, which comes 50 ms later.
    writer.write(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n")
    head = await _read_until(reader, b"\r\n\r\n")
    assert b"transfer-encoding: chunked" in head
    assert not reader._buffer  # nothing of the body yet
    assert (await _read_until(reader, b"data: 2\n\n\r\n")).endswith(b"data: 2\n\n\r\n")
    assert await _read_until(reader, b"0\r\n\r\n") == b"0\r\n\r\n"
    writer.close()
    await writer.wait_closed()
