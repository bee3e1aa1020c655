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
import random
import secrets
import time
from collections.abc import Mapping, MutableMapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
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
        from opentelemetry.sdk.util.instrumentation import InstrumentationScope
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.endpoint = endpoint
        self._provider = TracerProvider(
            resource=Resource.create({"service.name": service}),
            sampler=ParentBased(TraceIdRatioBased(min(max(sample_ratio, 0.0), 1.0))),
            id_generator=_preset_ids(),
        )
        # A queue for a few seconds of a busy web process's spans: past it they are dropped,
        # never waited for.
        processor = BatchSpanProcessor(
            exporter or OTLPSpanExporter(endpoint=endpoint),
            max_queue_size=16384,
            max_export_batch_size=1024,
        )
        self._provider.add_span_processor(processor)
        self._processor = processor
        self._resource = self._provider.resource
        self._scope = InstrumentationScope("llmfleet")
        self._tracer = self._provider.get_tracer("llmfleet")
        self._bound = round(min(max(sample_ratio, 0.0), 1.0) * (1 << 64))
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

    def begin(self, headers: Mapping[str, str] | None = None) -> Pending:
        """A span decided now and recorded when it ends (`record`): its ids and whether it is
        sampled, with no SDK work on the request's path but a few random bits. The child of
        the `traceparent` in `headers`, where there is a valid one."""
        parent = _parse(headers.get(TRACEPARENT, "")) if headers else None
        span_id = random.getrandbits(64) or 1
        if parent is not None:
            return Pending(parent[0], span_id, parent[2], parent[1])
        trace_id = random.getrandbits(128) or 1
        # The SDK's own ratio rule (TraceIdRatioBased), on the same id: the same decision.
        return Pending(trace_id, span_id, (trace_id & _LOW_64) < self._bound, None)

    def new_root(self) -> tuple[str, str] | None:
        """Ids for a new trace's root recorded later (`start`'s `ids`), or None when the
        sampling ratio leaves this trace out: everything recorded under it would be too."""
        trace_id = random.getrandbits(128) or 1
        if (trace_id & _LOW_64) >= self._bound:
            return None
        return f"{trace_id:032x}", f"{random.getrandbits(64) or 1:016x}"

    def child_of(self, parent: Pending) -> Pending:
        """A pending span under another (the agent's client span for the engine's exchange)."""
        return Pending(parent.trace_id, random.getrandbits(64) or 1, parent.sampled,
                       parent.span_id, local_parent=True)  # fmt: skip

    def record(
        self, pending: Pending, name: str, kind: str, start_ns: int,
        end_ns: int | None = None, error: str = "",
    ) -> None:  # fmt: skip
        """Record a pending span as it ends (nothing if unsampled): built whole and handed to
        the exporter's queue, without the SDK's live span, whose every attribute is checked
        and copied as it is set (a request's span would cost it 80 us that way)."""
        if not pending.sampled:
            return
        from opentelemetry import trace
        from opentelemetry.sdk.trace import Event, ReadableSpan
        from opentelemetry.trace import Status, StatusCode

        flags = trace.TraceFlags(trace.TraceFlags.SAMPLED)
        parent = None
        if pending.parent_id is not None:
            remote = not pending.local_parent
            parent = trace.SpanContext(pending.trace_id, pending.parent_id, remote, flags)
        span = ReadableSpan(
            name, trace.SpanContext(pending.trace_id, pending.span_id, False, flags), parent,
            # Copies: a request may still note usage on its record after its span is handed
            # over (a client that left), while the exporter's thread reads it.
            self._resource, dict(pending.attributes),
            [Event(event, attributes, at) for event, attributes, at in pending.events],
            [_link(*ids) for ids in pending.links], trace.SpanKind[kind.upper()],
            status=Status(StatusCode.ERROR, error) if error else Status(StatusCode.UNSET),
            start_time=start_ns, end_time=end_ns or time.time_ns(),
            instrumentation_scope=self._scope,
        )  # fmt: skip
        self._processor.on_end(span)

    def shutdown(self) -> None:
        """Export what is buffered, then stop (a process's last step)."""
        self._provider.shutdown()


_LOW_64 = (1 << 64) - 1


@dataclass
class Pending:
    """A span whose ids and sampling are decided, recorded as it ends (Tracer.record): what a
    request carries on its path instead of a live span, whose every attribute and event
    would cost a call into the SDK as it happens."""

    trace_id: int
    span_id: int
    sampled: bool
    parent_id: int | None
    local_parent: bool = False
    attributes: dict[str, str | int | float | bool] = field(default_factory=dict)
    events: list[tuple[str, dict[str, str | int | float | bool], int]] = field(default_factory=list)
    links: list[tuple[str, str]] = field(default_factory=list)

    @property
    def traceparent(self) -> str:
        """What the next hop continues: this span as its parent, sampled or not."""
        return f"00-{self.trace_id:032x}-{self.span_id:016x}-{'01' if self.sampled else '00'}"

    @property
    def ids(self) -> tuple[str, str]:
        return f"{self.trace_id:032x}", f"{self.span_id:016x}"

    def event(self, name: str, attributes: dict[str, str | int | float | bool]) -> None:
        if self.sampled:
            self.events.append((name, attributes, time.time_ns()))


def _parse(header: str) -> tuple[int, int, bool] | None:
    """A W3C traceparent's trace id, span id and sampled flag; None when it is not one."""
    parts = header.strip().split("-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == "ff":
        return None
    if len(parts[1]) != 32 or len(parts[2]) != 16 or len(parts[3]) != 2:
        return None
    try:
        trace_id, span_id, flags = int(parts[1], 16), int(parts[2], 16), int(parts[3], 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    return trace_id, span_id, bool(flags & 1)


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
