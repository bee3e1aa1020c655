"""The traffic bench/routing.py sends and what it makes of it: the workload (system prompts of
Zipf-like popularity, multi-turn chats), the oracle's hit ratio, sending every request in order
with its time to first token, and a path's figures."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from loadgen import p

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodeagent.engines.simcache import PrefixCache  # noqa: E402
from nodeagent.kvblocks import sim_prompt, word_ids  # noqa: E402

BLOCK_TOKENS = 16
ENGINES = 4
MAX_TOKENS = 4


@dataclass(frozen=True)
class Sizes:
    prompts: int
    system_words: int
    conversations: int
    turns: int
    cache_blocks: int
    prefill_ms: float
    concurrency: int


def workload(sizes: Sizes, seed: int, zipf: float = 1.1) -> list[list[dict[str, str]]]:
    """Every request's messages, in the order they are sent."""
    rng = random.Random(seed)  # noqa: S311 (a workload the same in every run, not a secret)
    systems = [
        " ".join(f"sys{n}-w{w}" for w in range(sizes.system_words)) for n in range(sizes.prompts)
    ]
    weights = [1 / (rank + 1) ** zipf for rank in range(sizes.prompts)]
    chats = [rng.choices(range(sizes.prompts), weights)[0] for _ in range(sizes.conversations)]
    order: list[list[dict[str, str]]] = []
    for turn in range(sizes.turns):
        for chat in rng.sample(range(sizes.conversations), sizes.conversations):
            messages = [{"role": "system", "content": systems[chats[chat]]}]
            for earlier in range(turn + 1):
                words = " ".join(f"c{chat}-t{earlier}-q{w}" for w in range(24))
                messages.append({"role": "user", "content": words})
                if earlier < turn:
                    answer = " ".join(f"c{chat}-t{earlier}-a{w}" for w in range(16))
                    messages.append({"role": "assistant", "content": answer})
            order.append(messages)
    return order


def sim_tokens(messages: list[dict[str, str]]) -> list[int]:
    """A chat's prompt tokens as the sim engine reads them (its prompt's words)."""
    return word_ids(sim_prompt({"messages": messages}, chat=True))


def oracle_hit_ratio(order: list[list[dict[str, str]]], sizes: Sizes) -> float:
    """One cache as large as all the engines' together, every request in order, as the sim
    engine reads each (`sim_tokens`)."""
    cache = PrefixCache(BLOCK_TOKENS, sizes.cache_blocks * ENGINES)
    hits = queries = 0
    for messages in order:
        tokens = sim_tokens(messages)
        hits += cache.serve(tokens, "oracle")
        queries += len(tokens)
    return hits / queries


@dataclass(frozen=True)
class Reading:
    """One engine's counters at a moment: prefix-cache hits and queries (tokens), and its TTFT
    histogram (upper bound in seconds → cumulative count)."""

    hits: float
    queries: float
    ttft: dict[float, float]


@dataclass
class Run:
    hit_ratio: float
    ttft_p50: float  # ms, inside the engines: a request's wait for a seat and prefill
    ttft_p90: float
    client_p50: float  # ms, as the client saw it: the hops in front of the engines included
    client_p90: float
    rps: float
    imbalance: float  # max/mean of the prompt tokens each engine took
    prefill_imbalance: float  # max/mean of those it did not hold: the prefill it did
    cpu_ms_per_request: float = float("nan")


def histogram_quantile(buckets: dict[float, float], q: float) -> float:
    """The q-quantile of a cumulative histogram, linear within its bucket, as Prometheus'
    histogram_quantile reads one (NaN when it is empty)."""
    bounds = sorted(buckets)
    if not bounds or not buckets[bounds[-1]]:
        return float("nan")
    rank, lower, below = q * buckets[bounds[-1]], 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if bound == float("inf"):
                return lower
            return lower + (bound - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = bound, count
    return lower


async def send_all(url: str | list[str], headers: dict[str, str], model: str,
                   order: list[list[dict[str, str]]], concurrency: int) -> tuple[list[float], float]:  # fmt: skip
    """Stream every request in order at `concurrency` (to several URLs: each request to the
    next, as a load balancer would): each one's time to first token (ms), and the wall
    seconds."""
    ttfts: list[float] = []
    urls = [url] if isinstance(url, str) else url
    pending = list(reversed(list(enumerate(order))))

    async def worker(session: aiohttp.ClientSession) -> None:
        while pending:
            number, messages = pending.pop()
            url = urls[number % len(urls)]
            body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
            started = time.perf_counter()
            first = None
            async with session.post(url, json=body) as response:
                assert response.status == 200, await response.text()
                async for line in response.content:
                    if first is None and line.startswith(b"data: {"):
                        choices = json.loads(line[6:]).get("choices") or [{}]
                        if (choices[0].get("delta") or {}).get("content"):
                            first = time.perf_counter()
            ttfts.append(((first or time.perf_counter()) - started) * 1000)

    async with aiohttp.ClientSession(
        headers=headers, connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        began = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        return ttfts, time.perf_counter() - began


def summarize(before: list[Reading], after: list[Reading], ttfts: list[float],
              seconds: float) -> Run:  # fmt: skip
    """A path's figures from its engines' counters before and after, and the client's TTFTs."""
    hits = [a.hits - b.hits for a, b in zip(after, before, strict=True)]
    queries = [a.queries - b.queries for a, b in zip(after, before, strict=True)]
    merged: dict[float, float] = {}
    for a, b in zip(after, before, strict=True):
        for bound, count in a.ttft.items():
            merged[bound] = merged.get(bound, 0.0) + count - b.ttft.get(bound, 0.0)
    prefill = [q - h for q, h in zip(queries, hits, strict=True)]
    return Run(
        hit_ratio=sum(hits) / sum(queries),
        ttft_p50=histogram_quantile(merged, 0.5) * 1000,
        ttft_p90=histogram_quantile(merged, 0.9) * 1000,
        client_p50=p(ttfts, 50), client_p90=p(ttfts, 90),
        rps=len(ttfts) / seconds, imbalance=max_over_mean(queries),
        prefill_imbalance=max_over_mean(prefill),
    )  # fmt: skip


def max_over_mean(values: list[float]) -> float:
    """How far the busiest engine is above the mean (NaN when none did anything)."""
    mean = statistics.mean(values)
    return max(values) / mean if mean else float("nan")


async def latencies_c1(url: str, headers: dict[str, str], model: str, count: int) -> list[float]:
    """Non-streaming requests one at a time, a 2-chunk prompt each (hashed by cache_aware)."""
    body = {"model": model, "max_tokens": 1,
            "messages": [{"role": "user", "content": "x " * 600}]}  # fmt: skip
    out = []
    async with aiohttp.ClientSession(headers=headers) as session:
        for _ in range(count):
            started = time.perf_counter()
            async with session.post(url, json=body) as response:
                await response.read()
            out.append((time.perf_counter() - started) * 1000)
    return out
