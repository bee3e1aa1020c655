"""The web process's HTTP/1.1 client to the agents (controlplane.gateway.agenthttp), against
real sockets that answer as an agent would, or as a broken one does."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from controlplane.gateway import agenthttp
from controlplane.gateway.agenthttp import (
    AgentConnections,
    AgentUnreachable,
    AnswerBroken,
)
from nodeagent.http1 import Dechunker
from tests.support import free_port

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]


class Agent:
    """A loopback server that reads each request and answers as its script says; it counts
    connections and the requests it read."""

    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.closed = asyncio.Event()
        self.port = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
                self.requests.append(head + await reader.readexactly(length))
                await self.script(reader, writer, len(self.requests))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            self.closed.set()
        finally:
            writer.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/models/org/tiny/v1/chat/completions"


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Script], Awaitable[Agent]]]:
    servers: list[asyncio.Server] = []

    async def start(script: Script) -> Agent:
        agent = Agent(script)
        server = await asyncio.start_server(agent.handle, "127.0.0.1", 0)
        agent.port = server.sockets[0].getsockname()[1]
        servers.append(server)
        return agent

    yield start
    for server in servers:
        server.close()


async def until_closed(reader: asyncio.StreamReader) -> None:
    """Hold the answer open until the client closes the connection."""
    await reader.read()
    raise ConnectionResetError


def plain(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%b" % (
        len(body),
        body,
    )


CHUNKED_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
)


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(data), data)


async def one_event_then_held(reader, writer, n):
    """A stream's head and first event, then nothing until the client closes."""
    writer.write(CHUNKED_HEAD + chunk(b"data: 1\n\n"))
    await writer.drain()
    await until_closed(reader)


async def test_a_plain_answer_is_read_whole_and_its_connection_kept(serve):
    async def answer(reader, writer, n):
        writer.write(plain(b'{"n": %d}' % n))

    agent = await serve(answer)
    pool = AgentConnections()
    for n in (1, 2, 3):
        got = await pool.post(agent.url, {"Authorization": "Bearer t"}, b'{"x": 1}')
        assert (got.status, got.headers["Content-Type"]) == (200, "application/json")
        assert await got.read() == b'{"n": %d}' % n
        got.release()
    assert agent.connections == 1  # one connection, kept between exchanges
    first = agent.requests[0]
    assert first.startswith(b"POST /models/org/tiny/v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer t\r\n" in first
    assert first.endswith(b'\r\n\r\n{"x": 1}')
    pool.close()


async def test_a_stream_is_dechunked_as_it_arrives(serve):
    events = [b'data: {"token": %d}\n\n' % i for i in range(5)]

    async def answer(reader, writer, n):
        writer.write(CHUNKED_HEAD)
        for event in events:
            writer.write(chunk(event))
            await writer.drain()
            await asyncio.sleep(0.01)
        writer.write(b"0\r\n\r\n")

    agent = await serve(answer)
    pool = AgentConnections()
    got = await pool.post(agent.url, {}, b"{}", idle=5)
    received = [data async for data in got.chunks()]
    assert b"".join(received) == b"".join(events)
    assert len(received) > 1  # handed on as they came, not gathered
    got.release()
    again = await pool.post(agent.url, {}, b"{}", idle=5)
    assert b"".join([data async for data in again.chunks()]) == b"".join(events)
    again.release()
    assert agent.connections == 1
    pool.close()


def test_the_dechunker_reads_framing_cut_anywhere():
    body = chunk(b"hello") + chunk(b"data: x\n\n") + b"1a;ext=1\r\n" + b"z" * 26 + b"\r\n"
    wire = body + b"0\r\nTrailer: yes\r\n\r\n"
    for first in range(len(wire)):
        for second in range(first, len(wire), 7):
            dechunker = Dechunker()
            out = []
            for piece in (wire[:first], wire[first:second], wire[second:]):
                out += dechunker.feed(piece)
            assert b"".join(out) == b"hello" + b"data: x\n\n" + b"z" * 26
            assert dechunker.done
            assert not dechunker.extra


@pytest.mark.parametrize(
    "wire",
    [
        b"zz\r\nab\r\n",
        b"2\r\nabXY",
        b"2\r\nab\r\n" + b"f" * 2000,
        b"0\r\nno-colon-no-end" + b"x" * 2000,
    ],
)
def test_the_dechunker_refuses_framing_that_is_not_http(wire):
    with pytest.raises(ValueError, match=r"chunk|trailer"):
        Dechunker().feed(wire)


@pytest.mark.parametrize(
    "reply",
    [
        b"",  # closes at once
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",  # says nothing HTTP
        b"HTTP/1.1 200 OK\r\nContent-",  # closes mid-head
    ],
)
async def test_no_status_line_is_unreachable(serve, reply):
    async def answer(reader, writer, n):
        writer.write(reply)
        writer.close()

    agent = await serve(answer)
    pool = AgentConnections()
    with pytest.raises(AgentUnreachable):
        await pool.post(agent.url, {}, b"{}")


async def test_nobody_listening_is_unreachable():
    pool = AgentConnections(connect_seconds=1)
    with pytest.raises(AgentUnreachable, match="cannot connect"):
        await pool.post(f"http://127.0.0.1:{free_port()}/models/org/tiny/v1/x", {}, b"{}")


@pytest.mark.parametrize(
    "reply",
    [
        plain(b'{"whole": true}')[:-4],  # short of its Content-Length
        CHUNKED_HEAD + chunk(b"data: 1\n\n"),  # no last chunk
        CHUNKED_HEAD + b"2\r\nabXY",  # a chunk without its CRLF
    ],
)
async def test_an_answer_that_breaks_off_is_broken(serve, reply):
    async def answer(reader, writer, n):
        writer.write(reply)
        await writer.drain()
        writer.close()

    agent = await serve(answer)
    pool = AgentConnections()
    got = await pool.post(agent.url, {}, b"{}")
    with pytest.raises(AnswerBroken):
        await got.read()
    got.close()


async def test_a_stream_silent_past_its_idle_limit_is_broken(serve):
    agent = await serve(one_event_then_held)
    pool = AgentConnections()
    got = await pool.post(agent.url, {}, b"{}", idle=0.3)
    chunks = got.chunks()
    received = [await anext(chunks)]
    with pytest.raises(AnswerBroken, match="silent"):
        await anext(chunks)
    assert received == [b"data: 1\n\n"]  # what came before the silence is relayed
    await asyncio.wait_for(agent.closed.wait(), 5)  # the agent sees the connection close


async def test_a_connection_the_agent_closed_while_kept_is_replaced(serve):
    async def answer(reader, writer, n):
        writer.write(plain(b"{}"))
        await writer.drain()
        writer.close()  # its keep-alive ran out: closed once the answer is out

    agent = await serve(answer)
    pool = AgentConnections()
    got = await pool.post(agent.url, {}, b"{}")
    await got.read()
    got.release()
    await asyncio.sleep(0.05)  # the close arrives while the connection is kept
    again = await pool.post(agent.url, {}, b"{}")
    assert await again.read() == b"{}"
    assert agent.connections == 2
    assert len(agent.requests) == 2


async def test_an_answer_left_unread_closes_its_connection(serve):
    agent = await serve(one_event_then_held)
    pool = AgentConnections()
    got = await pool.post(agent.url, {}, b"{}", idle=5)
    got.release()  # the client left: the agent must hear of it, to cancel the engine's work
    got.close()  # a second word on it changes nothing
    await asyncio.wait_for(agent.closed.wait(), 5)
    assert pool._kept.holds(("http", "127.0.0.1", agent.port)) == 0


async def test_a_request_cancelled_before_its_head_closes_the_connection(serve):
    async def answer(reader, writer, n):
        await until_closed(reader)

    agent = await serve(answer)
    pool = AgentConnections()
    posting = asyncio.ensure_future(pool.post(agent.url, {}, b"{}"))
    await asyncio.sleep(0.1)
    posting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await posting
    await asyncio.wait_for(agent.closed.wait(), 5)


async def test_a_header_with_a_line_break_is_never_sent(serve):
    agent = await serve(lambda reader, writer, n: asyncio.sleep(0))
    pool = AgentConnections()
    with pytest.raises(ValueError, match="line break"):
        await pool.post(agent.url, {"X-Trace": "a\r\nX-Injected: 1"}, b"{}")
    await asyncio.sleep(0.05)
    assert agent.requests == []


async def test_a_slow_reader_stops_the_agent_s_connection_being_read(serve):
    big = b"x" * 65536

    async def answer(reader, writer, n):
        writer.write(CHUNKED_HEAD)
        for _ in range(64):  # 4 MiB
            writer.write(chunk(big))
            await writer.drain()
        writer.write(b"0\r\n\r\n")

    agent = await serve(answer)
    pool = AgentConnections()
    got = await pool.post(agent.url, {}, b"{}", idle=5)
    chunks = got.chunks()
    total = len(await anext(chunks))
    await asyncio.sleep(0.5)  # the agent writes as fast as it can; the relay does not read
    connection = got._connection
    assert connection._paused
    assert connection._buffered < agenthttp._HIGH_WATER + 4 * 65536
    async for data in chunks:
        total += len(data)
    assert total == 64 * 65536
    got.release()
    pool.close()


async def test_a_plain_answer_that_breaks_off_is_the_client_s_502(serve):
    from controlplane.gateway import upstream

    async def answer(reader, writer, n):
        writer.write(plain(b'{"usage": {"prompt_tokens": 3}, "whole": true}')[:-6])
        await writer.drain()
        writer.close()

    agent = await serve(answer)
    charged: list[dict[str, object]] = []
    meter = upstream.Meter(charged.append, prompt_estimate=3)
    got = await AgentConnections().post(agent.url, {}, b"{}")
    response = await upstream.read_answer(got, 7, meter)
    assert response.status_code == 502
    assert b"failed mid-answer" in response.content
    assert charged == [{"prompt_tokens": 3, "completion_tokens": 0}]  # the prompt's work


async def test_a_plain_answer_larger_than_the_stream_buffer_is_read_whole(serve):
    body = b"[" + b"0.125, " * 300_000 + b"1]"  # 2 MiB of embeddings, in many reads

    async def answer(reader, writer, n):
        writer.write(plain(body))

    agent = await serve(answer)
    pool = AgentConnections()
    got = await pool.post(agent.url, {}, b"{}")
    assert await asyncio.wait_for(got.read(), 10) == body
    got.release()
    pool.close()


async def test_a_stream_framed_by_its_close_that_fell_silent_is_broken_not_done(serve):
    async def answer(reader, writer, n):
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\ndata: 1\n\n")
        await writer.drain()
        await until_closed(reader)

    agent = await serve(answer)
    got = await AgentConnections().post(agent.url, {}, b"{}", idle=0.2)
    chunks = got.chunks()
    assert await anext(chunks) == b"data: 1\n\n"
    await asyncio.sleep(0.6)  # the relay is busy elsewhere as the silence is called, then the close
    with pytest.raises(AnswerBroken, match="silent"):
        await anext(chunks)


def test_an_agent_url_is_split_and_its_path_encoded_once():
    assert agenthttp._address("https://[::1]:8443/models/org/tiny v2/v1/chat") == (
        ("https", "::1", 8443),
        "[::1]:8443",
        "/models/org/tiny%20v2/v1/chat",
    )
    assert agenthttp._address("http://gpu-1/models/org/a%20b/v1/x")[1:] == (
        "gpu-1",
        "/models/org/a%20b/v1/x",
    )
    assert agenthttp._address("http://gpu-1/x")[0] == ("http", "gpu-1", 80)
    with pytest.raises(AgentUnreachable):
        agenthttp._address("file:///etc/passwd")
