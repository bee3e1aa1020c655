"""OpenTelemetry traces for the gateway and the node agent alike (this module imports no Django).

Tracing is on where an OTLP endpoint is configured by OpenTelemetry's own variables
(`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, or `OTEL_EXPORTER_OTLP_ENDPOINT` with `/v1/traces`
added; headers, timeouts and the like are the exporter's own `OTEL_EXPORTER_OTLP_*`). Off,
`from_environment` returns None and nothing of OpenTelemetry is imported: every caller holds
`Tracer | None` and asks `if tracer is not None`, one comparison per request.

On, spans are sampled parent-based (a request that arrives with a sampled `traceparent` is
traced, one that arrives unsampled is not, and a new trace is sampled at the ratio given),
and exported in batches from the SDK's own thread, never in the event loop. Spans carry no
request body and no prompt: only what the operator's questions need (which model, which
replica and why, how long each step took, how it ended).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.id_generator import IdGenerator
    from opentelemetry.trace import Span

TRACEPARENT = "traceparent"
TRACESTATE = "tracestate"
# The W3C headers a hop passes on, and the only ones it reads.
TRACE_HEADERS = (TRACEPARENT, TRACESTATE)
Attributes = Mapping[str, str | int | float | bool]


def traces_endpoint(environ: Mapping[str, str]) -> str:
    """Where spans go, by OpenTelemetry's rule ('': tracing is off)."""
    if endpoint := environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip():
        return endpoint
    if base := environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip():
        return base.rstrip("/") + "/v1/traces"
    return ""


class Tracer:
    """One process's tracer: its spans name `service`, and go to `exporter` (by default
    OTLP/HTTP to `endpoint`) in batches."""

    def __init__(
        self, service: str, endpoint: str, sample_ratio: float = 1.0,
        exporter: SpanExporter | None = None,
    ) -> None:  # fmt: skip
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.endpoint = endpoint
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service}),
            sampler=ParentBased(TraceIdRatioBased(min(max(sample_ratio, 0.0), 1.0))),
            id_generator=_preset_ids(),
        )
        self._provider.add_span_processor(
            BatchSpanProcessor(exporter or OTLPSpanExporter(endpoint=endpoint))
        )
        self._tracer = self._provider.get_tracer("llmfleet")
        self._propagator = TraceContextTextMapPropagator()

    def start(
        self, name: str, *, parent: Mapping[str, str] | None = None, kind: str = "server",
        attributes: Attributes | None = None, links: Sequence[tuple[str, str]] = (),
        start_ns: int | None = None, ids: tuple[str, str] | None = None,
    ) -> Span:  # fmt: skip
        """A span, the child of the `traceparent` in `parent` (headers) where there is one, and
        linked to the spans `links` names (trace id, span id: hex, as `ids()` gives them).
        `ids` gives a new trace's root the ids chosen for it beforehand: a cold start's, which
        requests link to while it runs and its phases are recorded under once it ends."""
        from opentelemetry import trace

        context = self._propagator.extract(parent) if parent else None
        token = _PRESET.set(ids)
        try:
            return self._tracer.start_span(
                name, context=context, kind=trace.SpanKind[kind.upper()],
                attributes=attributes, links=[_link(*ids) for ids in links], start_time=start_ns,
            )  # fmt: skip
        finally:
            _PRESET.reset(token)

    def child(self, name: str, parent: Span, *, kind: str = "internal", **options: Any) -> Span:
        from opentelemetry import trace

        return self._tracer.start_span(
            name, context=trace.set_span_in_context(parent), kind=trace.SpanKind[kind.upper()],
            **options,
        )  # fmt: skip

    def inject(self, span: Span, headers: MutableMapping[str, str]) -> None:
        """`span`'s `traceparent` (and `tracestate`) into `headers`: the next hop's parent."""
        from opentelemetry import trace

        self._propagator.inject(headers, context=trace.set_span_in_context(span))

    def shutdown(self) -> None:
        """Export what is buffered, then stop (a process's last step)."""
        self._provider.shutdown()


# The ids of the span being started, where they were chosen beforehand (Tracer.start's `ids`).
_PRESET: ContextVar[tuple[str, str] | None] = ContextVar("preset_ids", default=None)


def _preset_ids() -> IdGenerator:
    """OpenTelemetry's random ids, or the preset ones for the span started now."""
    from opentelemetry.sdk.trace.id_generator import IdGenerator, RandomIdGenerator

    class PresetIds(IdGenerator):
        random = RandomIdGenerator()

        def generate_span_id(self) -> int:
            preset = _PRESET.get()
            return int(preset[1], 16) if preset else self.random.generate_span_id()

        def generate_trace_id(self) -> int:
            preset = _PRESET.get()
            return int(preset[0], 16) if preset else self.random.generate_trace_id()

    return PresetIds()


def new_ids() -> tuple[str, str]:
    """Ids for a root span started later (Tracer.start's `ids`), hex."""
    return secrets.token_hex(16), secrets.token_hex(8)


def traceparent(trace_id: str, span_id: str) -> dict[str, str]:
    """Headers naming a sampled span as the parent (a span recorded under another process's)."""
    return {TRACEPARENT: f"00-{trace_id}-{span_id}-01"}


def link(span: Span, trace_id: str, span_id: str) -> None:
    """Link `span` to another trace's span (a request to the cold start it waited on)."""
    span.add_link(_link(trace_id, span_id).context)


def _link(trace_id: str, span_id: str) -> Any:
    from opentelemetry import trace

    context = trace.SpanContext(
        int(trace_id, 16), int(span_id, 16), is_remote=True,
        trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED),
    )  # fmt: skip
    return trace.Link(context)


def ids(span: Span) -> tuple[str, str]:
    """A span's trace id and span id, hex (what a link, a log line or a trace UI names)."""
    context = span.get_span_context()
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"


def failed(span: Span, message: str) -> None:
    from opentelemetry.trace import Status, StatusCode

    span.set_status(Status(StatusCode.ERROR, message))


def trace_headers(header: Any) -> dict[str, str]:
    """The W3C trace headers among a request's, by a lookup `header(name) -> value | None`."""
    return {name: value for name in TRACE_HEADERS if (value := header(name))}


def from_environment(
    service: str, sample_ratio: float = 1.0, environ: Mapping[str, str] | None = None
) -> Tracer | None:
    """This process's tracer, or None where no OTLP endpoint is configured (tracing off)."""
    endpoint = traces_endpoint(os.environ if environ is None else environ)
    return Tracer(service, endpoint, sample_ratio) if endpoint else None
