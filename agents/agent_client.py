"""The control plane's side of the node agent's HTTP contract (shapes in nodeagent.protocol)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

from nodeagent.protocol import (
    HeartbeatResponse,
    LoadModelRequest,
    LoadModelResponse,
    LoadTimings,
    UnloadModelResponse,
)


class AgentCallFailed(Exception):
    """The agent could not be reached, or answered with an error (its code and message)."""

    def __init__(self, message: str, *, code: str = "unreachable", status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _post(
    session: aiohttp.ClientSession, url: str, token: str, body: dict[str, Any], seconds: float
) -> dict[str, Any]:
    try:
        async with session.post(
            url, json=body, headers=_headers(token), timeout=aiohttp.ClientTimeout(total=seconds)
        ) as response:
            try:
                answer = await response.json(content_type=None)
            except ValueError:
                answer = None
            if response.status >= 400 or not isinstance(answer, dict):
                error = (answer or {}).get("error") if isinstance(answer, dict) else None
                error = error if isinstance(error, dict) else {}
                raise AgentCallFailed(
                    str(error.get("message") or f"HTTP {response.status} from {url}"),
                    code=str(error.get("code") or "agent_error"),
                    status=response.status,
                )
            return answer
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AgentCallFailed(f"{url}: {type(exc).__name__}: {exc}") from None


async def load_model(
    base_url: str, token: str, request: LoadModelRequest, seconds: float
) -> LoadModelResponse:
    """`POST /load_model`: returns once the engine serves (or raises AgentCallFailed)."""
    async with aiohttp.ClientSession() as session:
        body = await _post(session, f"{base_url}/load_model", token, request.to_json(), seconds)
    timings = body.get("timings") or {}
    return LoadModelResponse(
        model_id=body["model_id"],
        inference_endpoint_url=body["inference_endpoint_url"],
        timings=LoadTimings(**{k: v for k, v in timings.items() if k in _TIMING_FIELDS}),
        cache_state=body.get("cache_state", "READY"),
        cache_level=body.get("cache_level", "GPU_RESIDENT"),
    )


_TIMING_FIELDS = set(asdict(LoadTimings()))


async def unload_model(
    base_url: str, token: str, model_id: str, to: str, seconds: float, *, force: bool = False
) -> UnloadModelResponse:
    """`POST /unload_model`: where the model ended up (maybe lower than asked: see `note`)."""
    async with aiohttp.ClientSession() as session:
        body = await _post(
            session,
            f"{base_url}/unload_model",
            token,
            {"model_id": model_id, "to": to, "force": force},
            seconds,
        )
    return UnloadModelResponse(
        model_id=body["model_id"],
        cache_state=body["cache_state"],
        cache_level=body["cache_level"],
        note=body.get("note", ""),
    )


@dataclass(frozen=True)
class HeartbeatTarget:
    agent_pk: int
    base_url: str


@dataclass(frozen=True)
class HeartbeatResult:
    agent_pk: int
    polled_at: float  # time.time() when the request was sent
    response: HeartbeatResponse | None
    error: str = ""


async def poll_heartbeats(
    targets: Sequence[HeartbeatTarget], token: str, *, seconds: float, concurrency: int = 256
) -> list[HeartbeatResult]:
    """Every agent's heartbeat, `concurrency` at a time over one connection pool."""
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=300)

    async def one(session: aiohttp.ClientSession, target: HeartbeatTarget) -> HeartbeatResult:
        async with limit:
            polled_at = time.time()
            try:
                body = await _post(session, f"{target.base_url}/heartbeat", token, {}, seconds)
                return HeartbeatResult(
                    target.agent_pk, polled_at, HeartbeatResponse.from_json(body)
                )
            except AgentCallFailed as exc:
                return HeartbeatResult(target.agent_pk, polled_at, None, str(exc))
            except (KeyError, TypeError, ValueError) as exc:
                error = f"heartbeat not in the contract's shape: {type(exc).__name__}: {exc}"
                return HeartbeatResult(target.agent_pk, polled_at, None, error)

    async with aiohttp.ClientSession(connector=connector) as session:
        return list(await asyncio.gather(*(one(session, target) for target in targets)))
