"""`/models/<model_id>/v1/...`: the authenticated way into a model's engine.

Request and response bytes pass through unchanged as they arrive (SSE
included), the answer's written on from the engine's connection as it is read
(`nodeagent.relay`). The server cancels the handler when the client goes away,
which closes the upstream connection, and the engine aborts the request.
"""

from __future__ import annotations

import asyncio
import functools
import posixpath
import time
from urllib.parse import urlsplit

import aiohttp
from aiohttp import HttpVersion11, web
from multidict import CIMultiDict

from nodeagent.adapters import LoadedAdapter
from nodeagent.batchgate import BatchGate, EngineBusy, batch_seats
from nodeagent.enginepool import EngineConnections
from nodeagent.engines.base import Engine, is_dead
from nodeagent.errors import AgentError
from nodeagent.metrics import AgentMetrics
from nodeagent.protocol import (
    ADAPTER_HEADER,
    ADAPTER_REVISION_HEADER,
    ADAPTER_SOURCE_HEADER,
    BATCH_CLASS,
    PRIORITY_CLASS_HEADER,
    SEQUENCES_HEADER,
    AdapterRef,
)
from nodeagent.registry import ModelRegistry
from nodeagent.relay import EngineUnreachable, StreamBroken
from nodeagent.tracing import TRACE_HEADERS, TRACEPARENT, Pending, Tracer

# Hop-by-hop headers belong to one connection, not to the message; the agent's
# token is for the agent, not the engine.
_REQUEST_DROP = {
    "host",
    "connection",
    "keep-alive",
    "transfer-encoding",
    "te",
    "upgrade",
    "authorization",
    "proxy-authorization",
    "content-length",
    ADAPTER_HEADER.lower(),
    ADAPTER_SOURCE_HEADER.lower(),
    ADAPTER_REVISION_HEADER.lower(),
    PRIORITY_CLASS_HEADER.lower(),
    SEQUENCES_HEADER.lower(),
}
# The engine's own adapter management: the agent's alone (nodeagent.adapters), never a caller's.
_ENGINE_ONLY = {"load_lora_adapter", "unload_lora_adapter"}
_RESPONSE_DROP = {
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "server",
    "date",
}


def engine_path(tail: str) -> str:
    """The path on the engine for a proxied `/models/<id>/v1/<tail>`: under `/v1/` once its
    `.` and `..` segments are resolved (as the HTTP client would resolve them on the way
    out), and never the engine's own adapter management. The check is made on what the
    engine will be asked, so `/v1/./load_lora_adapter` or `/v1/../sleep` cannot slip by."""
    # The tail is decoded once already; the HTTP client would decode an escape left in it
    # (`%252e` came in as `%2e`, and leaves as `.`) before resolving dot segments: no API path
    # of an engine holds a `%`, a backslash or a control character.
    if any(char in tail for char in "%\\") or any(ord(char) < 32 for char in tail):
        raise AgentError("not_found", "expected /models/<model_id>/v1/<path>", 404)
    path = posixpath.normpath("/v1/" + tail)
    name = path.removeprefix("/v1/")
    if not path.startswith("/v1/") or not name:
        raise AgentError("not_found", "expected /models/<model_id>/v1/<path>", 404)
    if name in _ENGINE_ONLY:
        raise AgentError(
            "not_found", "adapters are loaded through the agent: POST /load_adapter", 404
        )
    return path


def split_model_path(rest: str) -> tuple[str, str]:
    """`org/name/v1/chat/completions` → (`org/name`, `chat/completions`): ids hold slashes."""
    model_id, separator, tail = rest.partition("/v1/")
    if not separator or not model_id:
        raise AgentError("not_found", "expected /models/<model_id>/v1/<path>", 404)
    return model_id, tail


@functools.lru_cache(maxsize=256)
def _address(url: str) -> tuple[str, int]:
    """An engine's host and port from its URL (parsed once per engine, not per request)."""
    where = urlsplit(url)
    assert where.hostname is not None
    assert where.port is not None
    return where.hostname, where.port


def _filtered(
    headers: CIMultiDict[str] | aiohttp.typedefs.LooseHeaders, drop: set[str]
) -> CIMultiDict[str]:
    kept: CIMultiDict[str] = CIMultiDict()
    for name, value in CIMultiDict(headers).items():
        if name.lower() not in drop:
            kept.add(name, value)
    return kept


def _sequences(told: str | None) -> int:
    """The sequences a request asks for (SEQUENCES_HEADER), 1 when it says none or nonsense."""
    try:
        return min(max(int(told), 1), 1024) if told else 1
    except ValueError:
        return 1


class InferenceProxy:
    def __init__(
        self,
        registry: ModelRegistry,
        metrics: AgentMetrics,
        batch_reserve_percent: float = 10.0,
        batch_wait_seconds: float = 20.0,
        tracer: Tracer | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self.tracer = tracer  # None: tracing is off (nodeagent.tracing)
        # Batch-class requests yield to all others, engine by engine (nodeagent.batchgate).
        self.gates: dict[str, BatchGate] = {}
        self.batch_reserve_percent = batch_reserve_percent
        self.batch_wait_seconds = batch_wait_seconds
        # Set when the agent stops: new requests go elsewhere, open ones finish.
        self.draining = False
        self.request_ended = asyncio.Event()  # set as each request ends: what a drain waits on
        self.engines = EngineConnections()  # closed by the server at shutdown

    async def handle(
        self, request: web.Request, session: aiohttp.ClientSession
    ) -> web.StreamResponse:
        if self.tracer is None:
            return await self._handle(request, session, None)
        # The agent's span: the child of the gateway's (its traceparent), the parent of the
        # engine's. It covers the wait at the batch gate, an adapter's load and the relay.
        pending, started = self.tracer.begin(request.headers), time.time_ns()
        status, error = 500, ""
        try:
            response = await self._handle(request, session, pending)
            status = response.status
            return response
        except AgentError as exc:
            status, error = exc.status, exc.code
            raise
        except BaseException as exc:
            error = type(exc).__name__
            raise
        finally:
            if pending.sampled:
                pending.attributes.update({
                    "llmfleet.agent_id": self.registry.config.agent_id,
                    "llmfleet.path": request.match_info["rest"],
                    "llmfleet.priority_class":
                        request.headers.get(PRIORITY_CLASS_HEADER) or "interactive",
                    "http.response.status_code": status,
                })  # fmt: skip
                self.tracer.record(pending, "agent proxy", "server", started, error=error)

    async def _handle(
        self, request: web.Request, session: aiohttp.ClientSession, span: Pending | None
    ) -> web.StreamResponse:
        model_id, tail = split_model_path(request.match_info["rest"])
        path = engine_path(tail)
        if self.draining:
            raise AgentError("agent_draining", "this agent is stopping", 503, model_id)
        slot = self.registry.slots.get(model_id)
        if slot is None:
            raise AgentError("model_not_found", f"{model_id} is not on this agent", 404, model_id)
        engine = slot.engine
        if not slot.serving or engine is None:
            raise AgentError(
                "model_not_ready", f"{model_id} is {slot.state} ({slot.cache_level})", 503, model_id
            )
        body = await request.read()
        ref = AdapterRef.from_headers(request.headers)
        gate = self.gates.get(model_id) or self.gates.setdefault(model_id, BatchGate())
        seats = batch_seats(engine.max_num_seqs, self.batch_reserve_percent)
        sequences = _sequences(request.headers.get(SEQUENCES_HEADER))
        if request.headers.get(PRIORITY_CLASS_HEADER) == BATCH_CLASS:
            await self._enter_batch(gate, seats, model_id, sequences)
            # What changed while it waited: the agent began to stop, the model stepped down.
            if self.draining or not slot.serving or slot.engine is not engine:
                gate.leave(seats, sequences)
                if self.draining:
                    raise AgentError("agent_draining", "this agent is stopping", 503, model_id)
                raise AgentError("model_not_ready", f"{model_id} is {slot.state} "
                                 f"({slot.cache_level})", 503, model_id)  # fmt: skip
        else:
            gate.enter_now(sequences)
        slot.in_flight += 1
        slot.last_used = time.time()
        self.metrics.requests_in_flight.inc()
        adapter: LoadedAdapter | None = None
        try:
            if ref is not None:  # a LoRA adapter of this model: loaded first if need be
                adapter = await self.registry.acquire_adapter(model_id, ref, session)
            return await self._forward(request, session, engine, path, body, span)
        finally:
            if adapter is not None:
                self.registry.release_adapter(adapter)
            gate.leave(seats, sequences)
            slot.in_flight -= 1
            slot.last_used = time.time()
            self.metrics.requests_in_flight.dec()
            self.request_ended.set()

    async def _enter_batch(
        self, gate: BatchGate, seats: int, model_id: str, sequences: int
    ) -> None:
        self.metrics.batch_requests_waiting.inc()
        try:
            await gate.enter_batch(seats, self.batch_wait_seconds, sequences)
        except EngineBusy:
            self.metrics.proxy_errors.labels("engine_busy").inc()
            raise AgentError(
                "engine_busy", f"{model_id}'s engine had no room for a batch request within "
                f"{self.batch_wait_seconds:g} s: its seats serve other requests", 503, model_id,
            ) from None  # fmt: skip
        finally:
            self.metrics.batch_requests_waiting.dec()

    async def _forward(
        self,
        request: web.Request,
        session: aiohttp.ClientSession,
        engine: Engine,
        path: str,
        body: bytes,
        span: Pending | None = None,
    ) -> web.StreamResponse:
        host, port = _address(engine.url)
        headers = _filtered(request.headers, _REQUEST_DROP)
        if span is None or self.tracer is None:
            return await self._exchange(request, session, engine, path, body, host, port, headers)
        # The engine's spans (vLLM's, with --otlp-traces-endpoint) continue this one.
        exchange, started = self.tracer.child_of(span), time.time_ns()
        for name in TRACE_HEADERS:
            headers.popall(name, None)
        headers[TRACEPARENT] = exchange.traceparent
        try:
            return await self._exchange(request, session, engine, path, body, host, port, headers)
        finally:
            self.tracer.record(exchange, f"engine {request.method} {path}", "client", started)

    async def _exchange(
        self, request: web.Request, session: aiohttp.ClientSession, engine: Engine, path: str,
        body: bytes, host: str, port: int, headers: CIMultiDict[str],
    ) -> web.StreamResponse:  # fmt: skip
        try:
            connection, head = await self.engines.exchange(
                host, port, request.method, path, request.rel_url.raw_query_string,
                headers, body,
            )  # fmt: skip
        except EngineUnreachable as exc:
            self.metrics.proxy_errors.labels("engine_unreachable").inc()
            raise AgentError(
                "engine_unreachable", f"the engine did not answer: {exc}", 502
            ) from None
        try:
            if head.status >= 500 and await is_dead(session, engine.url):
                # vLLM's API server outlives its EngineCore (a worker killed by the OOM
                # killer, a GPU fault) and answers 500 to everything: that is no verdict
                # on this request, which another replica can answer.
                self.registry.engine_died(engine, f"it answered {head.status}, and "
                                          "its /health no longer does")  # fmt: skip
                self.metrics.proxy_errors.labels("engine_unreachable").inc()
                raise AgentError(
                    "engine_unreachable", "the engine died: the request was not served", 502
                )
            response = web.StreamResponse(
                status=head.status, reason=head.reason,
                headers=_filtered(head.headers, _RESPONSE_DROP),
            )  # fmt: skip
            if head.body and head.length is not None:  # (a HEAD's length is the engine's)
                response.content_length = head.length
            await response.prepare(request)
            if head.body and head.length != 0:
                # aiohttp chunks an answer of unknown length to an HTTP/1.1 client.
                chunked_out = head.length is None and request.version >= HttpVersion11
                await response.write(b"")  # the status line and headers, before the body
                try:
                    await connection.relay(request, chunked_out)
                except StreamBroken as exc:
                    # The status line is sent: all that is left is to cut the stream where it
                    # broke.
                    self.metrics.proxy_errors.labels("engine_stream_broken").inc()
                    raise ConnectionResetError(f"the engine's stream broke: {exc}") from None
            await response.write_eof()
        finally:
            self.engines.give_back(connection)
        self.metrics.proxy_requests.labels(f"{head.status // 100}xx").inc()
        return response
