"""The agent's hop to its engine (`nodeagent.relay`): framing read, not rebuilt, wherever the
engine's reads are cut; connections kept and a stale one retried; faults on either side.

The framing cases drive the connection's protocol directly with the engine's bytes (a test
double of the client's connection records what is written to it); the rest run a real agent
whose engine's address is pointed at a scripted HTTP server on loopback."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from nodeagent.relay import EngineConnection, EngineUnreachable, StreamBroken
from tests.nodeagent.conftest import load_body

HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
EVENTS = [b'data: {"n": %d}\n\n' % n for n in range(5)]
CHUNKED = b"".join(b"%x\r\n%b\r\n" % (len(event), event) for event in EVENTS)


class Transport(asyncio.Transport):
    """A connection that records what is written to it."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()
        self.closing = False
        self.reading = True

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True


class Client:
    """What `relay` needs of aiohttp's request: the client's transport, protocol and writer."""

    def __init__(self) -> None:
        self.transport = Transport()
        self.protocol = self  # writing_paused: never here
        self.writing_paused = False
        self.writer = self

    async def drain(self) -> None:
        return None


async def relayed(
    parts: list[bytes], chunked_out: bool = True, close: bool = False
) -> tuple[bytes, EngineConnection]:
    """What the client's connection gets when the engine's answer arrives cut into `parts`
    (and, with `close`, the engine closes the connection after them)."""
    connection = EngineConnection(("127.0.0.1", 1))
    engine = Transport()
    connection.connection_made(engine)
    connection.send("POST", "/v1/chat/completions", {"Accept": "*/*"}, b"{}")
    assert engine.data.startswith(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:1\r\n")
    assert engine.data.endswith(b"Content-Length: 2\r\n\r\n{}")
    head = asyncio.ensure_future(connection.head())
    fed = 0
    while not head.done():  # the parts that hold the status line and headers first
        connection.data_received(parts[fed])
        fed += 1
        await asyncio.sleep(0)
    await head
    client = Client()
    relay = asyncio.create_task(connection.relay(client, chunked_out))  # type: ignore[arg-type]
    await asyncio.sleep(0)
    for part in parts[fed:]:
        connection.data_received(part)
        await asyncio.sleep(0)
    if close:
        connection.connection_lost(None)
    await asyncio.wait_for(relay, 1)
    return bytes(client.transport.data), connection


def cuts(whole: bytes, *at: int) -> list[bytes]:
    edges = [0, *at, len(whole)]
    return [whole[a:b] for a, b in itertools.pairwise(edges) if b > a]


async def test_a_chunked_answer_passes_as_it_is_wherever_its_reads_are_cut():
    """Every cut of the engine's bytes in two, and in three around each: the same bytes reach
    the client, up to the last chunk (whose marker aiohttp's write_eof sends), and the
    connection is kept."""
    answer = HEAD + CHUNKED + b"0\r\n\r\n"
    for first in range(1, len(answer)):
        for second in (first + 1, first + 7):
            if second >= len(answer):
                continue
            data, connection = await relayed(cuts(answer, first, second))
            assert data == CHUNKED, (first, second)
            assert connection.reusable


async def test_a_chunked_answer_goes_without_framing_to_an_http10_client_and_trailers_end_it():
    answer = HEAD + CHUNKED + b"0\r\nX-Checksum: 1\r\n\r\n"
    for first in range(len(HEAD) + 1, len(answer), 3):
        data, connection = await relayed(cuts(answer, first), chunked_out=False)
        assert data == b"".join(EVENTS), first
        assert connection.reusable


async def test_declared_lengths_and_the_close_frame_an_answer_as_the_engine_did():
    body = b'{"ok": true}'
    head = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
    data, connection = await relayed(cuts(head + body, len(head) - 3, len(head) + 4), False)
    assert (data, connection.reusable) == (body, True)
    # No length, not chunked: the body ends with the connection, chunked to an HTTP/1.1 client.
    connection = EngineConnection(("127.0.0.1", 1))
    connection.connection_made(Transport())
    connection.send("GET", "/v1/models", {}, b"")
    connection.data_received(b"HTTP/1.1 200 OK\r\n\r\nfirst")
    await connection.head()
    client = Client()
    relay = asyncio.create_task(connection.relay(client, True))
    await asyncio.sleep(0)
    connection.data_received(b"second")
    connection.connection_lost(None)
    await asyncio.wait_for(relay, 1)
    assert bytes(client.transport.data) == b"5\r\nfirst\r\n6\r\nsecond\r\n"
    assert not connection.reusable


@pytest.mark.parametrize(
    ("tail", "why"),
    [
        ([b"5\r\nabc"], "broke off"),  # the engine closes mid-chunk
        ([b"zz\r\nabc\r\n"], "framing"),  # a size line that is not hex
        ([b"0x3\r\nabc\r\n"], "framing"),  # nor is this, for all Python's int() takes it
        ([b"3\nabc\r\n"], "framing"),  # a size line without its CR
        ([b"3\r\nabcXY0\r\n\r\n"], "framing"),  # a chunk not closed by CRLF
        ([b"3\r\nabc\r", b"X0\r\n\r\n"], "framing"),  # nor here, the CRLF cut by a read
    ],
)
async def test_an_answer_that_breaks_off_or_turns_to_garbage_is_stream_broken(tail, why):
    with pytest.raises(StreamBroken, match=why):
        await relayed([HEAD, *tail], close=True)


async def test_an_answer_whose_engine_closed_before_the_relay_began_is_relayed_whole():
    """The engine answers and closes (uvicorn's own 500: `Connection: close`) while the proxy
    is still busy between the status line and the relay: the bytes already read go first."""
    body = b"Internal Server Error"
    head = b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: %d\r\n" % len(body)
    for answer, chunked_out in (
        (head + b"Connection: close\r\n\r\n" + body, False),
        (b"HTTP/1.1 500 Oops\r\nConnection: close\r\n\r\n" + body, True),  # framed by the close
        (HEAD + CHUNKED + b"0\r\n\r\n", True),
    ):
        connection = EngineConnection(("127.0.0.1", 1))
        connection.connection_made(Transport())
        connection.send("POST", "/v1/completions", {}, b"{}")
        connection.data_received(answer)
        await connection.head()
        connection.connection_lost(None)  # before the relay: the proxy was checking /health
        client = Client()
        await asyncio.wait_for(connection.relay(client, chunked_out), 1)
        relayed_bytes = bytes(client.transport.data)
        assert relayed_bytes in (body, b"15\r\n" + body + b"\r\n", CHUNKED), relayed_bytes
        assert not connection.reusable


async def test_an_engine_that_closes_or_answers_garbage_before_its_status_is_unreachable():
    for answer in (b"", b"SSH-2.0-OpenSSH\r\n\r\n", b"HTTP/1.1 200 OK\r\nBroken\r\n\r\n"):
        connection = EngineConnection(("127.0.0.1", 1))
        connection.connection_made(Transport())
        connection.send("POST", "/v1/completions", {}, b"{}")
        if answer:
            connection.data_received(answer)
        connection.connection_lost(None)
        with pytest.raises(EngineUnreachable):
            await connection.head()
        assert not connection.reusable


# -- through a real agent, its engine a scripted server ----------------------------------


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class ScriptedEngine:
    """An HTTP server on loopback that answers each request as the test says, and counts the
    connections it was opened."""

    def __init__(self, answer: Script) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []
        self.drop_next = False  # close the connection on the next request, unanswered
        self.hold_next = 0.0  # take the next request, then close after this long, unanswered
        self.healthy = False  # answer GET /health 200 whatever the script says
        self.close_after = False  # close the connection after the next answer
        self.server: asyncio.Server | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (int(line.split(b":")[1]) for line in head.split(b"\r\n")
                     if line.lower().startswith(b"content-length:")), 0,
                )  # fmt: skip
                body = await reader.readexactly(length)
                if self.healthy and head.startswith(b"GET /health "):
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
                    await writer.drain()
                    continue
                if self.drop_next:
                    self.drop_next = False
                    return
                if self.hold_next:
                    self.requests.append(head + body)
                    await asyncio.sleep(self.hold_next)
                    self.hold_next = 0.0
                    return
                self.requests.append(head + body)
                await self.answer(reader, writer)
                if self.close_after:
                    self.close_after = False
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"


@pytest.fixture
async def scripted(agent, tiny_model) -> AsyncIterator[Callable[[Script], Awaitable[Any]]]:
    """Point the agent's org/tiny at a scripted engine."""
    await agent.post("/load_model", load_body(tiny_model))
    servers: list[asyncio.Server] = []

    async def use(answer: Script) -> ScriptedEngine:
        engine = ScriptedEngine(answer)
        engine.server = await asyncio.start_server(engine.serve, "127.0.0.1", 0)
        servers.append(engine.server)
        slot = agent.server.registry.slots["org/tiny"]
        assert slot.engine is not None
        slot.engine.url = engine.url
        return engine

    yield use
    for server in servers:
        server.close()


def url_of(agent) -> str:
    return f"{agent.url}/models/org/tiny/v1/chat/completions"


async def test_a_kept_connection_is_reused_and_one_the_engine_closed_is_retried(agent, scripted):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    async def post() -> None:
        async with agent.http.post(url_of(agent), json={}, headers=agent.headers) as response:
            assert (response.status, await response.read()) == (200, b"ok")

    engine = await scripted(answer)
    for _ in range(3):
        await post()
    assert (engine.connections, len(engine.requests)) == (1, 3)
    # The engine's keep-alive runs out as the next request is sent: it closes the connection
    # without reading it. The agent sends it again on a new connection.
    engine.drop_next = True
    await post()
    assert (engine.connections, len(engine.requests)) == (2, 4)
    # One it closed while idle is not used again.
    engine.close_after = True
    await post()
    await asyncio.sleep(0.05)  # the close reaches the agent
    await post()
    assert (engine.connections, len(engine.requests)) == (3, 6)
    # One the engine closes after working on the request a while (it crashed, say) is not
    # sent again: the engine may have done the work. The gateway hears engine_unreachable.
    engine.hold_next = 0.3
    async with agent.http.post(url_of(agent), json={}, headers=agent.headers) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "engine_unreachable"
    assert (engine.connections, len(engine.requests)) == (3, 7)


async def test_a_stream_the_engine_cuts_is_cut_for_the_client_and_counted(agent, scripted):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + CHUNKED[:40])
        await writer.drain()
        writer.transport.abort()

    await scripted(answer)
    async with agent.http.post(url_of(agent), json={}, headers=agent.headers) as response:
        assert response.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.read()
    metrics = agent.server.metrics
    assert metrics.proxy_errors.labels("engine_stream_broken")._value.get() == 1
    assert agent.server.registry.slots["org/tiny"].in_flight == 0


async def test_an_engine_that_answers_garbage_is_unreachable_to_the_gateway(agent, scripted):
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"garbage\r\n\r\n")
        await writer.drain()

    await scripted(answer)
    async with agent.http.post(url_of(agent), json={}, headers=agent.headers) as response:
        assert response.status == 502
        assert (await response.json())["error"]["code"] == "engine_unreachable"


async def test_a_slow_client_pauses_the_engine_and_loses_nothing(agent, scripted):
    """32 MiB in 64 KiB chunks, written as fast as the engine can, to a client that reads
    slowly: the agent stops reading the engine while the client's connection is full, so the
    engine's writes wait on the client (it finishes only once the client has read most of it:
    what is left fits the sockets' buffers between them), and every byte arrives in order."""
    block = bytes(range(256)) * 256
    total = 512
    read = 0
    read_when_written: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        for n in range(total):
            writer.write(b"%x\r\n%b\r\n" % (len(block), bytes([n % 256]) + block[1:]))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        read_when_written.append(read)

    await scripted(answer)
    expected = hashlib.sha256()
    for n in range(total):
        expected.update(bytes([n % 256]) + block[1:])
    host, port = agent.url.removeprefix("http://").split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connecting: it holds
    sock.connect((host, int(port)))
    reader, writer = await asyncio.open_connection(sock=sock, limit=2**20)
    path = "/models/org/tiny/v1/chat/completions"
    writer.write(
        f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: {agent.headers['Authorization']}\r\n"
        "Content-Length: 2\r\nConnection: close\r\n\r\n{}".encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    got = hashlib.sha256()
    while True:
        size = int((await reader.readline()).strip(), 16)
        if size == 0:
            break
        got.update(await reader.readexactly(size))
        read += size
        assert await reader.readexactly(2) == b"\r\n"
        await asyncio.sleep(0.0005)
    writer.close()
    assert got.hexdigest() == expected.hexdigest()
    # Without the pause the agent would have taken all 32 MiB at once, the client a few KiB.
    assert read_when_written[0] >= total * len(block) - 16 * 2**20
    assert agent.server.registry.slots["org/tiny"].in_flight == 0


async def test_the_request_reaches_the_engine_as_the_client_sent_it(agent, scripted):
    """Header bytes as they came (UTF-8 included), the query string as it was; the agent's
    token and hop-by-hop headers dropped."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    engine = await scripted(answer)
    host, port = agent.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /models/org/tiny/v1/chat/completions?a=1&b=%20 HTTP/1.1\r\nHost: x\r\n"
        + f"Authorization: {agent.headers['Authorization']}\r\n".encode()
        + b"X-Note: caf\xc3\xa9\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}"
    )
    assert (await reader.read()).startswith(b"HTTP/1.1 204")
    writer.close()
    (sent,) = engine.requests
    assert sent.startswith(b"POST /v1/chat/completions?a=1&b=%20 HTTP/1.1\r\n")
    assert b"\r\nX-Note: caf\xc3\xa9\r\n" in sent
    assert b"Authorization" not in sent
    assert b"Connection" not in sent
    assert sent.endswith(b"\r\n\r\n{}")


async def test_a_server_error_that_closes_its_connection_reaches_the_client_whole(agent, scripted):
    """uvicorn answers an exception of its application with a 500 and `Connection: close`,
    and closes at once; the agent, checking the engine's /health meanwhile (a live one),
    relays that answer whole."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(
            b"HTTP/1.1 500 Internal Server Error\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"connection: close\r\ncontent-length: 21\r\n\r\nInternal Server Error"
        )
        await writer.drain()
        writer.close()

    engine = await scripted(answer)
    engine.healthy = True
    async with agent.http.post(url_of(agent), json={}, headers=agent.headers) as response:
        assert (response.status, await response.read()) == (500, b"Internal Server Error")
    assert agent.server.registry.slots["org/tiny"].serving
