"""The control plane's tracers (nodeagent.tracing): one per process and role, made on first use
from settings, None while tracing is off (`TRACING_ENDPOINT` empty: no OTLP endpoint set)."""

from __future__ import annotations

import functools
from contextvars import ContextVar
from typing import Any

from django.conf import settings

from nodeagent.tracing import TRACEPARENT, Tracer, failed, link, traceparent

# The traceparent of the /v1 request being served (its span's), in the request's own context:
# work it asks for in the database's thread (a cold start's load) carries it on.
ASKING: ContextVar[dict[str, str] | None] = ContextVar("asking", default=None)
# A task message's header naming the span that asked for the task, which its span links to.
ASKED_BY = "llmfleet_asked_by"

GATEWAY = "llmfleet-gateway"  # /v1 requests, wherever they are served (web, batches)
LIFECYCLE = "llmfleet-lifecycle"  # cold starts: their phases, as the fleet's state records them


@functools.cache
def tracer(service: str = GATEWAY) -> Tracer | None:
    if not settings.TRACING_ENDPOINT:
        return None
    return Tracer(service, settings.TRACING_ENDPOINT, settings.TRACING_SAMPLE_RATIO)


def trace_url(trace_id: str) -> str:
    """The trace in the operator's trace UI (TRACING_UI_URL), '' where none is configured."""
    if not (settings.TRACING_UI_URL and trace_id):
        return ""
    return settings.TRACING_UI_URL.replace("{trace_id}", trace_id)


def cold_start_ids() -> tuple[str, str]:
    """A new load's trace ids: blank while tracing is off, or when sampling leaves it out."""
    lifecycle = tracer(LIFECYCLE)
    return (lifecycle.new_root() if lifecycle is not None else None) or ("", "")


def load_task_headers(trace_id: str, span_id: str) -> dict[str, str] | None:
    """A load task's message headers: the cold start's trace, its span's parent, and the
    request that asked for it (ASKING), its link. None while tracing is off."""
    if not trace_id:
        return None
    headers = traceparent(trace_id, span_id)
    if (asking := ASKING.get()) and asking[TRACEPARENT].endswith("-01"):  # a sampled request
        headers[ASKED_BY] = asking[TRACEPARENT]
    return headers


def task_started(task: Any) -> None:
    """A worker's span for a task whose message carries a traceparent (a load: the child of
    its cold start's root, linked to the request that asked for it). Celery's task_prerun."""
    request = task.request
    parent = getattr(request, TRACEPARENT, None) or (request.headers or {}).get(TRACEPARENT)
    if not parent or (lifecycle := tracer(LIFECYCLE)) is None:
        return
    span = lifecycle.start(f"task {task.name}", parent={TRACEPARENT: parent}, kind="consumer",
                        attributes={"celery.task_id": str(request.id)})  # fmt: skip
    asked_by = getattr(request, ASKED_BY, None) or (request.headers or {}).get(ASKED_BY)
    if asked_by and len(parts := str(asked_by).split("-")) == 4:
        link(span, parts[1], parts[2])
    request.llmfleet_span = span


def task_ended(task: Any, state: str | None) -> None:
    """The task's span ends with it (Celery's task_postrun)."""
    span = getattr(task.request, "llmfleet_span", None)
    if span is not None:
        span.set_attribute("celery.state", str(state))
        if state != "SUCCESS":
            failed(span, str(state))
        span.end()
