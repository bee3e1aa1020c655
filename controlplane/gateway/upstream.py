"""Sending a request to a replica's node agent, and relaying its answer byte for byte."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from agents.models import Placement
from agents.scheduling import ReplicaLoad, choose_replica

log = logging.getLogger(__name__)

_CONNECT = aiohttp.ClientTimeout(total=None, sock_connect=3)
# Requests this web process has in flight per placement: routing's freshest load signal.
# Other web processes count their own; the engine queue from heartbeats covers the rest.
in_flight: Counter[int] = Counter()
_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def session() -> aiohttp.ClientSession:
    """One long-lived client session per event loop (daphne runs one)."""
    loop = asyncio.get_running_loop()
    current = _sessions.get(loop)
    if current is None or current.closed:
        for stale in [other for other in _sessions if other.is_closed()]:
            del _sessions[stale]
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        current = _sessions[loop] = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers={"Accept-Encoding"}
        )
    return current


def pick(placements: list[Placement], user: str | None, tried: set[int]) -> Placement | None:
    """The replica to try next: least loaded, or the user's own while it is not overloaded."""
    candidates = {p.pk: p for p in placements if p.pk not in tried}
    loads = [
        ReplicaLoad(str(p.pk), in_flight[p.pk], p.requests_waiting, p.kv_cache_usage)
        for p in candidates.values()
    ]
    chosen = choose_replica(loads, user)
    return None if chosen is None else candidates[int(chosen.key)]


class Unreachable(Exception):
    """The agent did not answer before the first byte: another replica may."""


async def open_upstream(placement: Placement, path: str, raw: bytes) -> aiohttp.ClientResponse:
    url = f"{placement.inference_endpoint_url}/v1/{path}"
    headers = {
        "Authorization": f"Bearer {settings.AGENT_TOKEN}",
        "Content-Type": "application/json",
    }
    try:
        return await session().post(url, data=raw, headers=headers, timeout=_CONNECT)
    except (aiohttp.ClientConnectionError, TimeoutError) as exc:
        raise Unreachable(f"{placement.agent.agent_id}: {exc}") from None


def _error_event(message: str) -> bytes:
    error = {
        "error": {
            "message": message,
            "type": "server_error",
            "param": None,
            "code": "upstream_failed",
        }
    }
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


async def _relay(upstream: aiohttp.ClientResponse, placement_id: int) -> AsyncIterator[bytes]:
    finished = False
    try:
        async for chunk in upstream.content.iter_any():
            yield chunk
        finished = True
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone: the stream ends with an error event, as OpenAI clients expect.
        log.warning("stream from placement %s broke: %s", placement_id, exc)
        yield _error_event(f"The model's server failed mid-stream: {exc}")
        finished = True
    finally:
        # A client that went away cancels us here: closing the connection tells the agent,
        # which cancels the engine's request.
        upstream.release() if finished else upstream.close()
        in_flight[placement_id] -= 1


async def relay(
    upstream: aiohttp.ClientResponse, placement: Placement
) -> HttpResponse | StreamingHttpResponse:
    """The engine's answer as the client's: its status, content type and bytes, unchanged."""
    content_type = upstream.headers.get("Content-Type", "application/json")
    if content_type.startswith("text/event-stream"):
        response = StreamingHttpResponse(
            _relay(upstream, placement.pk), status=upstream.status, content_type=content_type
        )
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    try:
        body = await upstream.read()
    finally:
        upstream.release()
        in_flight[placement.pk] -= 1
    return HttpResponse(body, status=upstream.status, content_type=content_type)
