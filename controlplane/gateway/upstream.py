"""One replica's node agent over HTTP: sending a request, telling a replica that cannot answer
from an answer, and relaying an answer byte for byte. The router (router.py) decides which
replica and what to do when one fails; nothing here keeps state between requests."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from django.conf import settings
from django.http import HttpResponse, StreamingHttpResponse
from django.http.response import HttpResponseBase

from agents.faults import Fault
from agents.models import Placement
from controlplane.gateway.agenthttp import (
    AgentAnswer,
    AgentConnections,
    AgentUnreachable,
    AnswerBroken,
)
from controlplane.gateway.apis import Api
from controlplane.gateway.errors import openai_error
from controlplane.gateway.stats import RequestRecord
from nodeagent.protocol import (
    AGENT_ERROR_HEADER,
    BATCH_CLASS,
    PRIORITY_CLASS_HEADER,
    SEQUENCES_HEADER,
    AdapterRef,
)

log = logging.getLogger(__name__)

# The agent's own error codes that say "not here, not now": another replica may answer.
_FAULT_BY_AGENT_CODE = {
    "model_not_found": Fault.NOT_SERVING,
    "model_not_ready": Fault.NOT_SERVING,
    "engine_unreachable": Fault.NOT_SERVING,
    "agent_draining": Fault.DRAINING,
    "unauthorized": Fault.UNREACHABLE,  # a token the agent does not take: nothing will pass
    "adapters_busy": Fault.NO_ROOM,
    "adapter_unavailable": Fault.NO_ROOM,
    "cache_full": Fault.NO_ROOM,
    "lora_disabled": Fault.NO_LORA,
    "engine_busy": Fault.BUSY,
}
# The agent's codes for an adapter that cannot load anywhere (its files fail verification, its
# rank is too high, the store refuses): the client's answer, whatever the status, and never
# a reason to mark the replica (nodeagent.registry.acquire_adapter).
_ADAPTER_CODE_PREFIX = "adapter_"


class ReplicaFailed(Exception):
    """The replica cannot answer this request; it has not sent the client anything."""

    def __init__(self, fault: Fault, message: str) -> None:
        super().__init__(message)
        self.fault = fault


@dataclass(frozen=True)
class AgentRefusal:
    """The agent refused the request itself (e.g. a body over its limit): the client's error."""

    status: int
    code: str
    message: str


async def post(
    agents: AgentConnections,
    placement: Placement,
    path: str,
    raw: bytes,
    stream: bool,
    seconds_left: float,
    adapter: AdapterRef | None = None,
    priority_class: str | None = None,
    sequences: int = 1,
    trace: dict[str, str] | None = None,
) -> AgentAnswer:
    """The replica's answer, headers read and body not; ReplicaFailed when it has none.

    A stream's headers come as soon as the engine takes the request, so waiting
    longer than GATEWAY_STREAM_HEADERS_TIMEOUT_SECONDS (or `seconds_left` of the
    request's own deadline) means the replica is stuck: NOT_SERVING, that model there
    alone, since its agent answers. A non-streaming answer's headers come with its
    whole body, so it gets no such limit.
    """
    url = f"{placement.inference_endpoint_url}/v1/{path}"
    headers = {
        "Authorization": f"Bearer {placement.agent.credential}",
        "Content-Type": "application/json",
    }
    if adapter is not None:
        headers.update(adapter.headers())
    if priority_class == BATCH_CLASS:  # it yields to others on the engine too
        headers[PRIORITY_CLASS_HEADER] = BATCH_CLASS
    if sequences > 1:  # each of its `n` takes an engine seat
        headers[SEQUENCES_HEADER] = str(sequences)
    if trace:  # the request's span, which the agent's continues
        headers.update(trace)
    # A stream that goes silent past GATEWAY_STREAM_IDLE_SECONDS is given up (relay_chunks
    # ends it with an error event); a plain answer comes whole, however long it takes.
    idle = settings.GATEWAY_STREAM_IDLE_SECONDS if stream else None
    sent = agents.post(url, headers, raw, idle)
    limit = max(min(settings.GATEWAY_STREAM_HEADERS_TIMEOUT_SECONDS, seconds_left), 0.1)
    try:
        answer = await (asyncio.wait_for(sent, limit) if stream else sent)
    except AgentUnreachable as exc:
        raise ReplicaFailed(Fault.UNREACHABLE, f"{placement.agent.agent_id}: {exc}") from None
    except TimeoutError:
        # A batch-class request may wait at its agent for room on a busy engine: no verdict on
        # the replica, which other requests show alive or not.
        fault = Fault.BUSY if priority_class == BATCH_CLASS else Fault.NOT_SERVING
        raise ReplicaFailed(
            fault, f"no stream headers from {placement.agent.agent_id} in {limit:.0f} s"
        ) from None
    if 300 <= answer.status < 400:
        # Never a redirect: an agent answering `303 Location: http://169.254.169.254/...`
        # would have the web process fetch that address and hand the body to the client.
        answer.close()
        # Outside the contract: the agent is not trusted with this request, nor the next.
        raise ReplicaFailed(
            Fault.UNREACHABLE,
            f"{placement.agent.agent_id} answered with a redirect ({answer.status}), refused",
        )
    return answer


async def refusal(answer: AgentAnswer) -> AgentRefusal | None:
    """The agent's own refusal, when `answer` is one (the engine's answers pass as they are);
    raises ReplicaFailed when the refusal says that another replica may serve."""
    code = answer.headers.get(AGENT_ERROR_HEADER)
    if code is None:
        return None
    try:
        body = await answer.read()
    except AnswerBroken:
        body = b""
    finally:
        answer.release()
    try:
        message = str(json.loads(body)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        message = body[:200].decode(errors="replace")
    fault = _FAULT_BY_AGENT_CODE.get(code)
    if code.startswith(_ADAPTER_CODE_PREFIX) and fault is None:
        return AgentRefusal(answer.status, code, message)
    if fault is not None or answer.status >= 500:
        raise ReplicaFailed(fault or Fault.NOT_SERVING, f"{code}: {message}")
    return AgentRefusal(answer.status, code, message)


UsageSink = Callable[[dict[str, Any]], None]


def ask_for_usage(raw: bytes, body: dict[str, Any]) -> tuple[bytes, bool]:
    """The body (`raw`, already parsed as `body`) with `stream_options.include_usage` set, and
    whether the gateway added it (then the usage event is the gateway's to read and remove)."""
    options = body.get("stream_options") or {}
    if options.get("include_usage"):
        return raw, False
    return json.dumps({**body, "stream_options": {**options, "include_usage": True}}).encode(), True


class Meter:
    """What one request used, said once: the engine's usage when it reported one, otherwise
    (a client that left, a stream that broke) an estimate of what was spent on it: the
    prompt's estimated tokens and one token per content event relayed."""

    def __init__(self, on_usage: UsageSink, prompt_estimate: int) -> None:
        self.on_usage = on_usage
        self.prompt_estimate = prompt_estimate
        self.usage: dict[str, Any] | None = None
        self.relayed_events = 0
        self.settled = False

    def settle(self) -> None:
        if self.settled:
            return
        self.settled = True
        if self.usage is not None:
            self.on_usage(self.usage)
        else:
            self.on_usage(
                {"prompt_tokens": self.prompt_estimate, "completion_tokens": self.relayed_events}
            )


_USAGE = b'"usage"'


def _may_report_usage(chunk: bytes) -> bool:
    """Whether `chunk` may hold a usage report: a `"usage"` member that is not null. OpenAI's
    own streams put `"usage": null` in every chunk once usage is asked for, and a response's
    first events carry one too; a model's text never holds `"usage"` unescaped."""
    at = chunk.find(_USAGE)
    while at >= 0:
        value = chunk[at + len(_USAGE) : at + len(_USAGE) + 8].lstrip(b" :")
        if not value.startswith(b"null"):
            return True
        at = chunk.find(_USAGE, at + len(_USAGE))
    return False


class UsageScanner:
    """Finds the engine's usage event in an SSE stream, dropping it when the client did not ask,
    and counts the content events relayed until then (the estimate if no usage comes).

    Bytes pass unchanged, held back at most to the end of the current event. A chunk of whole
    events without a usage report (nearly every chunk: one token's event, or a few) passes as
    it is, its output events counted by a scan; only a chunk that may hold the report, or that
    ends mid-event, is split into events.
    """

    def __init__(self, strip: bool, meter: Meter, api: Api = Api.CHAT) -> None:
        self.strip = strip
        self.meter = meter
        self.api = api
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.meter.usage is not None and not self.strip:
            # Found, and the client's to keep: pass the rest straight through, in order.
            if not self.pending:
                return chunk
            held, self.pending = self.pending, b""
            return held + chunk
        if not self.pending and chunk.endswith(b"\n\n"):
            if self.meter.usage is not None:  # found and stripped: the rest is the client's
                return chunk
            if not _may_report_usage(chunk):
                self.meter.relayed_events += self.api.count_outputs(chunk)
                return chunk
        *events, self.pending = (self.pending + chunk).split(b"\n\n")
        kept = []
        for event in events:
            taken = self.meter.usage is None and _USAGE in event and self._take_usage(event)
            if taken and self.strip:
                continue
            if not taken and self.api.is_output(event):
                self.meter.relayed_events += 1
            kept.append(event + b"\n\n")
        return b"".join(kept)

    def _take_usage(self, event: bytes) -> bool:
        usage = self.api.stream_usage(event)
        if usage is None:
            return False
        self.meter.usage = usage
        return True

    def rest(self) -> bytes:
        pending, self.pending = self.pending, b""
        return pending


async def relay_chunks(
    upstream: AgentAnswer, placement_id: int, scanner: UsageScanner
) -> AsyncGenerator[bytes, None]:
    """An SSE answer's bytes as they come. Whoever iterates this must close it (the router's
    claim does): a client that went away cancels it, and closing the connection tells the
    agent, which cancels the engine's request."""
    finished = False
    try:
        async for chunk in upstream.chunks():
            if kept := scanner.feed(chunk):
                yield kept
        if rest := scanner.rest():
            yield rest
        finished = True
    except AnswerBroken as exc:
        # Headers are gone: the stream ends with an error event, as OpenAI clients expect.
        log.warning("stream from placement %s broke: %s", placement_id, exc)
        # The client hears that it broke; what broke (hosts, ports) is the log's.
        yield scanner.api.error_event("The model's server failed mid-stream.")
        finished = True
    finally:
        upstream.release() if finished else upstream.close()
        scanner.meter.settle()


def on_close(response: HttpResponseBase, step: Callable[[], object]) -> None:
    """Run `step` when Django closes the response, however it ended: a streamed response's
    generator may never reach its `finally` (a client that left while it waited at a yield)."""
    response._resource_closers.append(step)  # type: ignore[attr-defined]


async def observed(
    chunks: AsyncIterator[bytes], record: RequestRecord, api: Api, status: int
) -> AsyncGenerator[bytes, None]:
    """The stream as it was, timing its first token and counting how it ended (502: it ended
    with an error event). Checks are prefix tests and one scan of bytes, per chunk."""
    try:
        async for chunk in chunks:
            if api.is_error(chunk):
                status = 502
                record.first_token()
            elif record.first_token_at is None and api.has_output(chunk):
                record.first_token()
            yield chunk
    finally:
        record.finish(status)


def sse_response(
    chunks: AsyncIterator[bytes],
    record: RequestRecord,
    api: Api,
    status: int = 200,
    cleanup: Callable[[], None] | None = None,
) -> StreamingHttpResponse:
    """A streamed answer, observed for the request's figures (`observed`); `cleanup` runs when
    Django closes the response, however it ended."""
    response = StreamingHttpResponse(
        observed(chunks, record, api, status), status=status, content_type="text/event-stream"
    )
    # A client that leaves mid-stream may leave `observed` waiting at a yield forever.
    on_close(response, lambda: record.finish(499))
    if cleanup is not None:
        on_close(response, cleanup)
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def read_answer(upstream: AgentAnswer, placement_id: int, meter: Meter) -> HttpResponse:
    """A non-streaming answer as the client's, its usage to `meter` (an estimate when the
    client leaves first: the engine did the prompt's work)."""
    content_type = upstream.headers.get("Content-Type", "application/json")
    try:
        body = await upstream.read()
    except AnswerBroken as exc:
        upstream.close()
        meter.settle()
        log.warning("answer from placement %s broke: %s", placement_id, exc)
        return openai_error(502, "The model's server failed mid-answer.", code="upstream_error")
    except BaseException:
        upstream.close()
        meter.settle()
        raise
    upstream.release()
    if upstream.status == 200 and b'"usage"' in body:
        try:
            usage = json.loads(body).get("usage")
        except (ValueError, AttributeError):
            usage = None
        if usage:
            meter.usage = usage
            meter.settle()
    return HttpResponse(body, status=upstream.status, content_type=content_type)
