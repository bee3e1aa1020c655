"""The control plane's tracers (nodeagent.tracing): one per process and role, made on first use
from settings, None while tracing is off (`TRACING_ENDPOINT` empty: no OTLP endpoint set)."""

from __future__ import annotations

import functools

from django.conf import settings

from nodeagent.tracing import Tracer

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
