"""A cold start as a trace of its own (OpenTelemetry), recorded from its LoadEvent as it ends.

Its root's ids were chosen as the load was queued (LoadEvent.trace_id, span_id): requests that
waited on it link to them meanwhile, from any web process. The phases come from the event's
own timings, the same ones the dashboard's timeline draws: queued, download (from which source,
how many bytes), engine start (standby or plain, compile cache), and, when a client gets it,
the first token. Nothing here runs while tracing is off (the event's ids are blank).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from agents.models import LoadEvent
from controlplane import traces
from nodeagent.tracing import Tracer, failed, traceparent

if TYPE_CHECKING:
    from opentelemetry.trace import Span


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _ns(moment: datetime) -> int:
    """Nanoseconds since the epoch, exact (a float's timestamp() would round them)."""
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1000


def _tracer(event: LoadEvent) -> Tracer | None:
    return traces.tracer(traces.LIFECYCLE) if event.trace_id and event.span_id else None


def record_cold_start(event: LoadEvent) -> None:
    """The load's trace, once it succeeded or failed: its root and its phases so far."""
    tracer = _tracer(event)
    if tracer is None or event.finished_at is None:
        return
    root = tracer.start(
        f"cold start {event.model.model_id}", ids=(event.trace_id, event.span_id),
        kind="internal", start_ns=_ns(event.queued_at),
        attributes={"llmfleet.model": event.model.model_id, "llmfleet.agent": event.agent.agent_id,
                    "llmfleet.trigger": event.trigger, "llmfleet.outcome": event.outcome,
                    "llmfleet.from_level": event.from_level, "llmfleet.load_event": event.pk},
    )  # fmt: skip
    parent = traceparent(event.trace_id, event.span_id)
    at = event.started_at or event.queued_at
    _phase(tracer, parent, "queued", event.queued_at).end(_ns(at))
    if event.download_seconds:
        end = at + timedelta(seconds=event.download_seconds)
        given_up = [line for line in event.failed_sources.splitlines() if line]
        download = _phase(tracer, parent, "download", at, source=event.source,
                          bytes=event.bytes_downloaded or 0, failovers=len(given_up))  # fmt: skip
        for failure in given_up:  # each source given up on before `source` served
            download.add_event("source failed", {"llmfleet.source": failure[:1000]}, _ns(at))
        download.end(_ns(end))
        at = end
    if event.engine_start_seconds:
        end = at + timedelta(seconds=event.engine_start_seconds)
        engine = _phase(
            tracer, parent, "engine start", at, engine_start=event.engine_start,
            compile_cache=event.compile_cache, note=event.engine_start_note[:300],
        )  # fmt: skip
        if event.compile_cache_seconds is not None:  # its first step: the compile cache
            cache_end = at + timedelta(seconds=event.compile_cache_seconds)
            tracer.child("compile cache", engine, start_time=_ns(at),
                         attributes={"llmfleet.compile_cache": event.compile_cache}
                         ).end(_ns(cache_end))  # fmt: skip
        engine.end(_ns(end))
    if event.error:
        failed(root, event.error[:300])
    root.end(_ns(event.finished_at))


def record_first_token(event: LoadEvent, seconds: float) -> None:
    """The cold start's last phase: from the engine's readiness to a client's first token."""
    tracer = _tracer(event)
    if tracer is not None and event.finished_at is not None:
        end = event.finished_at + timedelta(seconds=seconds)
        _phase(tracer, traceparent(event.trace_id, event.span_id), "first token",
               event.finished_at).end(_ns(end))  # fmt: skip


def _phase(
    tracer: Tracer, parent: dict[str, str], name: str, start: datetime, **attributes: str | int,
) -> Span:  # fmt: skip
    """A phase's span under the cold start's root, started at `start`; its caller ends it."""
    return tracer.start(name, parent=parent, kind="internal", start_ns=_ns(start),
                        attributes={f"llmfleet.{k}": v for k, v in attributes.items()})  # fmt: skip
