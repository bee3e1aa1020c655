"""The load a benchmark sends from its own process (aiohttp): requests and streams by a number
of workers, each starting the next as its last ends, and their percentiles."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable

import aiohttp

# The request `measure` sends unless told otherwise: a short chat of bench/gateway.py's sim.
BODY = {"model": "bench/sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


async def closed_loop(
    headers: dict[str, str],
    count: int,
    concurrency: int,
    one: Callable[[aiohttp.ClientSession], Awaitable[None]],
) -> float:
    """`count` calls of `one` by `concurrency` workers, each starting the next as its last
    ends; the wall seconds."""
    queue = list(range(count))
    async with aiohttp.ClientSession(
        headers=headers, connector=aiohttp.TCPConnector(limit=0)
    ) as session:

        async def worker() -> None:
            while queue:
                queue.pop()
                await one(session)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.perf_counter() - began


async def measure(
    url: str, headers: dict[str, str], count: int, concurrency: int, body: dict[str, object] = BODY
) -> tuple[list[float], float]:
    """Latencies (ms) of `count` requests at `concurrency`, and the wall seconds."""
    latencies: list[float] = []

    async def one(session: aiohttp.ClientSession) -> None:
        started = time.perf_counter()
        async with session.post(url, json=body) as response:
            await response.read()
            assert response.status == 200, f"{url}: {await response.text()}"
        latencies.append((time.perf_counter() - started) * 1000)

    seconds = await closed_loop(headers, count, concurrency, one)
    return latencies, seconds


async def first_chunk(
    url: str, headers: dict[str, str], count: int, body: dict[str, object] = BODY
) -> list[float]:
    times = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url, json=body | {"stream": True}) as response:
                assert response.status == 200, await response.text()
                await response.content.readany()
                times.append((time.perf_counter() - started) * 1000)
                await response.read()
    return times


async def stream_load(
    url: str, headers: dict[str, str], count: int, concurrency: int, body: dict[str, object]
) -> float:
    """Stream `count` answers (bench/gateway.py's: STREAM_TOKENS tokens each) at `concurrency`;
    the wall seconds. Each answer is read as it comes, and must end with `data: [DONE]`."""

    async def one(session: aiohttp.ClientSession) -> None:
        async with session.post(url, json=body) as response:
            assert response.status == 200, await response.text()
            tail = b""
            async for chunk in response.content.iter_any():
                tail = (tail + chunk)[-32:]
            assert tail.rstrip().endswith(b"data: [DONE]"), tail

    return await closed_loop(headers, count, concurrency, one)


def p(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[int(q) - 1] if len(values) > 1 else values[0]
