"""What the agent needs of an engine, and the HTTP calls every engine answers.

Both engines speak vLLM's HTTP API on 127.0.0.1 (`/health`, `/v1/models`,
`/metrics`, and the sleep endpoints where supported), so readiness, metrics
and sleep/wake are the same code for both; only starting and stopping differ.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import aiohttp

from nodeagent.metrics import EngineStats, parse_engine_metrics

if TYPE_CHECKING:
    from nodeagent.kvevents import KvFeed

_QUICK = aiohttp.ClientTimeout(total=2)


class EngineError(RuntimeError):
    """An engine that would not start or stopped on its own. `code` names the kind."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class EngineExit:
    """How an engine ended. `expected` is False when it ended without being asked to."""

    expected: bool
    returncode: int | None
    detail: str


class Engine(Protocol):
    name: str
    model_id: str
    url: str
    supports_sleep: bool
    # What it publishes of its KV cache, as the agent reads it (None: it publishes nothing);
    # it closes with the engine.
    kv_feed: KvFeed | None
    # How many requests it runs at once (0: unknown): the gateway holds the rest.
    max_num_seqs: int

    async def start(self, session: aiohttp.ClientSession, deadline: float) -> None:
        """Start and return once it serves; raise EngineError (and leave nothing running) if not."""

    async def stop(self) -> None:
        """Stop for good and release everything it held. Safe to call twice."""

    async def wait(self) -> EngineExit:
        """Return when the engine has ended, asked to or not."""


async def is_ready(session: aiohttp.ClientSession, url: str, model_id: str) -> bool:
    """Ready when /health answers 200 and /v1/models lists the model."""
    try:
        async with session.get(f"{url}/health", timeout=_QUICK) as health:
            if health.status != 200:
                return False
        async with session.get(f"{url}/v1/models", timeout=_QUICK) as models:
            if models.status != 200:
                return False
            listed = await models.json()
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    return any(entry.get("id") == model_id for entry in listed.get("data", []))


async def is_dead(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether the engine says it cannot serve: its /health answers anything but 200, or
    nothing listens there any more. A /health too slow to answer says nothing (a busy engine
    is not a dead one)."""
    try:
        async with session.get(f"{url}/health", timeout=_QUICK) as health:
            return health.status != 200
    except TimeoutError:
        return False
    except aiohttp.ClientError:
        return True


async def wait_until_ready(
    engine: Engine,
    session: aiohttp.ClientSession,
    model_id: str,
    deadline: float,
    exited: asyncio.Future[EngineExit],
) -> None:
    """Poll readiness until ready, the engine exits (EngineError) or the deadline passes."""
    loop = asyncio.get_running_loop()
    while True:
        if exited.done():
            gone = exited.result()
            raise EngineError("engine_exited", f"engine exited during start-up ({gone.detail})")
        if await is_ready(session, engine.url, model_id):
            return
        if loop.time() >= deadline:
            raise EngineError("load_timeout", "engine was not ready before the load deadline")
        await asyncio.wait([exited], timeout=0.5)


async def read_stats(session: aiohttp.ClientSession, url: str) -> EngineStats | None:
    """The engine's load from its /metrics, or None if it did not answer in time."""
    try:
        async with session.get(f"{url}/metrics", timeout=_QUICK) as response:
            if response.status != 200:
                return None
            return parse_engine_metrics(await response.text())
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


async def sleep_engine(session: aiohttp.ClientSession, url: str) -> None:
    """vLLM sleep mode level 1: weights to host RAM, KV cache dropped."""
    async with session.post(
        f"{url}/sleep", params={"level": "1"}, timeout=aiohttp.ClientTimeout(total=120)
    ) as r:
        if r.status != 200:
            raise EngineError(
                "sleep_failed", f"engine refused to sleep: HTTP {r.status} {await r.text()}"
            )


async def wake_engine(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(f"{url}/wake_up", timeout=aiohttp.ClientTimeout(total=300)) as r:
        if r.status != 200:
            raise EngineError(
                "wake_failed", f"engine refused to wake: HTTP {r.status} {await r.text()}"
            )


async def load_lora(session: aiohttp.ClientSession, url: str, name: str, path: Path) -> None:
    """vLLM's runtime LoRA loading (VLLM_ALLOW_RUNTIME_LORA_UPDATING): the adapter in `path`
    served under `name`."""
    async with session.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": str(path)},
        timeout=aiohttp.ClientTimeout(total=120),
    ) as r:
        text = await r.text()
        if r.status != 200 and "already been loaded" not in text:
            raise EngineError(
                "adapter_load_failed",
                f"the engine refused the adapter: HTTP {r.status} {text[:500]}",
            )


async def unload_lora(session: aiohttp.ClientSession, url: str, name: str) -> None:
    """The adapter out of the engine; one the engine does not have is out already."""
    async with session.post(
        f"{url}/v1/unload_lora_adapter",
        json={"lora_name": name},
        timeout=aiohttp.ClientTimeout(total=60),
    ) as r:
        text = await r.text()
        if r.status != 200 and r.status != 404 and "not found" not in text.lower():
            raise EngineError(
                "adapter_unload_failed",
                f"the engine kept the adapter: HTTP {r.status} {text[:500]}",
            )
