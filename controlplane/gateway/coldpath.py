"""The gateway's side of a cold start: a request for a model that no replica serves yet.

A non-streaming request waits (coldstart.wait_until_ready) and then takes the
warm path. A streaming one gets its headers at once and SSE comment lines with the
load's progress while it waits, so clients and proxies see a live connection.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http import JsonResponse, StreamingHttpResponse

from agents import actions
from agents.models import Model, Placement
from agents.scheduling import needs_scale_out
from controlplane.gateway import cache, coldstart, upstream
from controlplane.gateway.errors import openai_error
from controlplane.gateway.loops import in_background

# When each model last asked for a replica more, per process: one ask per interval is enough.
_scale_out_asked: dict[int, float] = {}
_SCALE_OUT_EVERY_SECONDS = 5.0


def not_ready(message: str) -> JsonResponse:
    response = openai_error(503, message, code="model_not_ready")
    response["Retry-After"] = str(settings.GATEWAY_RETRY_AFTER_SECONDS)
    return response


def after_first_answer(placement: Placement) -> None:
    """Record the cold start's last phase, time to first token, off the request's path."""
    in_background(sync_to_async(actions.record_first_token)(placement.pk))


def maybe_scale_out(model: Model, placements: list[Placement]) -> None:
    """Ask for another replica when every one is over the queue threshold (no request waits)."""
    if not needs_scale_out(
        upstream.scores(placements),
        threshold=settings.SCALE_OUT_QUEUE_THRESHOLD,
        replicas=len(placements),
        max_replicas=model.max_replicas,
    ):
        return
    now = time.monotonic()
    if now - _scale_out_asked.get(model.pk, -1e9) < _SCALE_OUT_EVERY_SECONDS:
        return
    _scale_out_asked[model.pk] = now
    from controlplane.celery import app

    in_background(asyncio.to_thread(app.send_task, "agents.tasks.scale_out", args=(model.pk,)))


def stream_after_load(
    model: Model,
    path: str,
    raw: bytes,
    user: str | None,
    strip_usage: bool,
    on_usage: upstream.UsageSink,
) -> StreamingHttpResponse:
    response = StreamingHttpResponse(
        _events(model, path, raw, strip_usage, on_usage), content_type="text/event-stream"
    )
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"
    return response


async def _events(
    model: Model, path: str, raw: bytes, strip_usage: bool, on_usage: upstream.UsageSink
) -> AsyncIterator[bytes]:
    yield f": loading {model.model_id}\n\n".encode()
    progress: asyncio.Queue[str] = asyncio.Queue()
    said: list[str] = []

    def on_progress(text: str) -> None:
        if not said or said[-1] != text:
            said.append(text)
            progress.put_nowait(text)

    waiter = asyncio.ensure_future(
        coldstart.wait_until_ready(model, settings.COLD_START_TIMEOUT_SECONDS, on_progress)
    )
    try:
        while not waiter.done():
            heard = asyncio.ensure_future(progress.get())
            done, _ = await asyncio.wait(
                {waiter, heard}, timeout=10.0, return_when=asyncio.FIRST_COMPLETED
            )
            if heard in done:
                yield f": loading {model.model_id}: {heard.result()}\n\n".encode()
            else:
                heard.cancel()
                if not done:  # nothing new for a while: still say something, proxies time out
                    yield f": loading {model.model_id}\n\n".encode()
        placement = waiter.result()
    except coldstart.ColdStartFailed as exc:
        yield upstream.error_event(str(exc), code="model_not_ready")
        return
    finally:
        waiter.cancel()  # a client that left stops waiting; the load itself goes on
    cache.forget_placements(model)
    upstream.in_flight[placement.pk] += 1
    try:
        answer = await upstream.open_upstream(placement, path, raw)
    except upstream.Unreachable as exc:
        upstream.in_flight[placement.pk] -= 1
        yield upstream.error_event(f"The model's server could not be reached: {exc}")
        return
    if answer.status != 200 or not answer.headers.get("Content-Type", "").startswith(
        "text/event-stream"
    ):
        try:
            body = await answer.read()
        finally:
            answer.release()
            upstream.in_flight[placement.pk] -= 1
        yield upstream.error_event(_error_message(answer.status, body))
        return
    first = True
    async for chunk in upstream.relay_chunks(
        answer, placement.pk, upstream.UsageScanner(strip_usage), on_usage
    ):
        if first:
            after_first_answer(placement)
            first = False
        yield chunk


def _error_message(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return f"The model's server answered {status}: {message or body[:200].decode(errors='replace')}"
