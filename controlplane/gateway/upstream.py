"""Sending a request to a replica's node agent, and relaying its answer byte for byte."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse

from agents.models import Placement
from agents.scheduling import ReplicaLoad, choose_replica, replica_score
from controlplane.gateway.loops import per_loop

log = logging.getLogger(__name__)

_CONNECT = aiohttp.ClientTimeout(total=None, sock_connect=3)
# Requests this web process has in flight per placement: routing's freshest load signal.
# Other web processes count their own; the engine queue from heartbeats covers the rest.
in_flight: Counter[int] = Counter()
_sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}


def _new_session() -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
    return aiohttp.ClientSession(
        connector=connector, auto_decompress=False, skip_auto_headers={"Accept-Encoding"}
    )


def session() -> aiohttp.ClientSession:
    """One long-lived client session per event loop (daphne runs one)."""
    return per_loop(_sessions, _new_session)


def scores(placements: list[Placement]) -> list[float]:
    return [
        replica_score(ReplicaLoad(str(p.pk), in_flight[p.pk], p.requests_waiting, p.kv_cache_usage))
        for p in placements
    ]


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


UsageSink = Callable[[dict[str, Any]], None]


def ask_for_usage(raw: bytes, body: dict[str, Any]) -> tuple[bytes, bool]:
    """The body (`raw`, already parsed as `body`) with `stream_options.include_usage` set, and
    whether the gateway added it (then the usage event is the gateway's to read and remove)."""
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        return raw, False
    return json.dumps({**body, "stream_options": {**options, "include_usage": True}}).encode(), True


class UsageScanner:
    """Finds the engine's usage event in an SSE stream, dropping it when the client did not ask.

    Bytes pass unchanged, held back at most to the end of the current event.
    """

    def __init__(self, strip: bool) -> None:
        self.strip = strip
        self.pending = b""
        self.usage: dict[str, Any] | None = None

    def feed(self, chunk: bytes) -> bytes:
        if self.usage is not None and not self.strip:
            # Found, and the client's to keep: pass the rest straight through, in order.
            held, self.pending = self.pending, b""
            return held + chunk
        *events, self.pending = (self.pending + chunk).split(b"\n\n")
        kept = []
        for event in events:
            taken = self.usage is None and b'"usage"' in event and self._take_usage(event)
            if taken and self.strip:
                continue
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def _take_usage(self, event: bytes) -> bool:
        try:
            data = json.loads(event.removeprefix(b"data: "))
        except ValueError:
            return False
        if isinstance(data, dict) and data.get("usage") and not data.get("choices"):
            self.usage = data["usage"]
            return True
        return False

    def rest(self) -> bytes:
        pending, self.pending = self.pending, b""
        return pending


def error_event(message: str, code: str = "upstream_failed") -> bytes:
    """An OpenAI-shaped error as the last event of a stream whose headers are already sent."""
    error = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(error)}\n\ndata: [DONE]\n\n".encode()


async def relay_chunks(
    upstream: aiohttp.ClientResponse, placement_id: int, scanner: UsageScanner, on_usage: UsageSink
) -> AsyncIterator[bytes]:
    """An SSE answer's bytes as they come; the placement's in-flight count ends with it."""
    finished = False
    try:
        async for chunk in upstream.content.iter_any():
            if kept := scanner.feed(chunk):
                yield kept
        if rest := scanner.rest():
            yield rest
        finished = True
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone: the stream ends with an error event, as OpenAI clients expect.
        log.warning("stream from placement %s broke: %s", placement_id, exc)
        yield error_event(f"The model's server failed mid-stream: {exc}")
        finished = True
    finally:
        # A client that went away cancels us here: closing the connection tells the agent,
        # which cancels the engine's request.
        upstream.release() if finished else upstream.close()
        in_flight[placement_id] -= 1
        if scanner.usage is not None:
            on_usage(scanner.usage)


async def relay(
    upstream: aiohttp.ClientResponse, placement: Placement, strip_usage: bool, on_usage: UsageSink
) -> HttpResponse | StreamingHttpResponse:
    """The engine's answer as the client's: its status, content type and bytes, unchanged
    (but for a usage event the gateway asked for itself); its usage goes to `on_usage`."""
    content_type = upstream.headers.get("Content-Type", "application/json")
    if content_type.startswith("text/event-stream"):
        chunks = relay_chunks(upstream, placement.pk, UsageScanner(strip_usage), on_usage)
        response = StreamingHttpResponse(chunks, status=upstream.status, content_type=content_type)
        response["Cache-Control"] = "no-cache"
        response["X-Accel-Buffering"] = "no"
        return response
    try:
        body = await upstream.read()
    finally:
        upstream.release()
        in_flight[placement.pk] -= 1
    if upstream.status == 200 and b'"usage"' in body:
        try:
            usage = json.loads(body).get("usage")
        except (ValueError, AttributeError):
            usage = None
        if usage:
            on_usage(usage)
    return HttpResponse(body, status=upstream.status, content_type=content_type)
