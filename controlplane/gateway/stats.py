"""Per-model request figures: Prometheus metrics at once, dashboard minutes in batches.

Each request ends in `RequestRecord.finish`: it counts the request in the process's
Prometheus metrics (microseconds, on the request's path) and adds it to this
process's minute buckets, which a task writes every `GATEWAY_USAGE_FLUSH_SECONDS`
as one upsert per model and minute, then announces to the dashboard.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from django.db import IntegrityError
from django.db.models import F

from controlplane import metrics, traces
from controlplane.gateway.batches import Batches
from nodeagent.tracing import TRACEPARENT, Pending


@dataclass
class RequestRecord:
    """One /v1 completion request, filled in as the view learns about it; counted into
    `buffer` (its event loop's, controlplane.gateway.state) as it ends."""

    buffer: StatsBuffer | None = None
    started: float = field(default_factory=time.perf_counter)
    model: str = "-"  # a catalog model_id once known; never what a client made up
    model_pk: int | None = None
    start: str = "warm"  # or "cold": the request waited for a load
    queued: bool = False  # it waited for a seat (controlplane.gateway.admission)
    shed: bool = False  # admission refused it or gave it up
    first_token_at: float | None = None
    finished: bool = False
    name: str = "POST /v1"  # its span's name
    # Its span, where tracing is on (controlplane.traces): decided as the request starts,
    # what the request learns noted on it as it goes, recorded as it is counted.
    trace: Pending | None = None
    trace_start_ns: int = 0

    def first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()
            if self.trace is not None:
                self.trace.event("first token", {})

    def note(self, **attributes: str | int | float | bool) -> None:
        """Attributes of the request's span (llmfleet.<name>); nothing while tracing is off."""
        if self.trace is not None and self.trace.sampled:
            self.trace.attributes.update({f"llmfleet.{k}": v for k, v in attributes.items()})

    def event(self, name: str, **attributes: str | int | float | bool) -> None:
        if self.trace is not None:
            self.trace.event(name, {f"llmfleet.{k}": v for k, v in attributes.items()})

    def trace_headers(self) -> dict[str, str] | None:
        """The `traceparent` the next hop continues (None while tracing is off)."""
        return None if self.trace is None else {TRACEPARENT: self.trace.traceparent}

    def finish(self, status: int) -> None:
        """Count the request once, however many ways its end is seen (499: the client left)."""
        if self.finished:
            return
        self.finished = True
        if self.trace is not None:
            self._record_span(status)
        now = time.perf_counter()
        duration = now - self.started
        ttft = (self.first_token_at or now) - self.started
        metrics.REQUESTS.labels(self.model, str(status)).inc()
        if self.model_pk is None:
            return
        metrics.REQUEST_DURATION.labels(self.model, self.start).observe(duration)
        if status < 400:
            metrics.TIME_TO_FIRST_TOKEN.labels(self.model, self.start).observe(ttft)
        if self.buffer is not None:
            self.buffer.add(self.model_pk, status, self.start, ttft if status < 400 else None,
                            self.queued, self.shed)  # fmt: skip

    def _record_span(self, status: int) -> None:
        assert self.trace is not None
        tracer = traces.tracer()
        if tracer is None or not self.trace.sampled:
            return
        self.note(model=self.model, start=self.start, queued=self.queued, shed=self.shed)
        self.trace.attributes["http.response.status_code"] = status
        if self.first_token_at is not None:
            self.note(ttft_ms=round((self.first_token_at - self.started) * 1000, 3))
        error = "" if status < 500 and status != 499 else (
            "client left" if status == 499 else f"status {status}"
        )  # fmt: skip
        tracer.record(self.trace, self.name, "server", self.trace_start_ns, error=error)


class StatsBuffer(Batches[tuple[int, datetime]]):
    """Per (model, minute): requests, errors, warm TTFT sum and count, cold TTFT sum and count,
    requests that waited for a seat, requests admission shed."""

    width = 8
    what = "request figures of (model, minute)"

    def add(
        self, model_pk: int, status: int, start: str, ttft: float | None,
        queued: bool = False, shed: bool = False,
    ) -> None:  # fmt: skip
        minute = datetime.now(UTC).replace(second=0, microsecond=0)
        counts = self.counts((model_pk, minute))
        counts[0] += 1
        counts[1] += status >= 500
        counts[6] += queued
        counts[7] += shed
        if ttft is not None:
            at = 2 if start == "warm" else 4
            counts[at] += ttft
            counts[at + 1] += 1

    async def write(self, key: tuple[int, datetime], counts: list[float]) -> None:
        await record_minute(*key, counts)


async def record_minute(model_pk: int, minute: datetime, counts: list[float]) -> None:
    from agents import events
    from controlplane.gateway.models import RequestMinute

    added = {
        "requests": F("requests") + int(counts[0]),
        "errors": F("errors") + int(counts[1]),
        "warm_ttft_seconds": F("warm_ttft_seconds") + counts[2],
        "warm_requests": F("warm_requests") + int(counts[3]),
        "cold_ttft_seconds": F("cold_ttft_seconds") + counts[4],
        "cold_requests": F("cold_requests") + int(counts[5]),
        "queued": F("queued") + int(counts[6]),
        "shed": F("shed") + int(counts[7]),
    }
    rows = RequestMinute.objects.filter(model_id=model_pk, minute=minute)
    if not await rows.aupdate(**added):
        try:
            await RequestMinute.objects.acreate(
                model_id=model_pk, minute=minute, requests=int(counts[0]), errors=int(counts[1]),
                warm_ttft_seconds=counts[2], warm_requests=int(counts[3]),
                cold_ttft_seconds=counts[4], cold_requests=int(counts[5]),
                queued=int(counts[6]), shed=int(counts[7]),
            )  # fmt: skip
        except IntegrityError:  # another web process created the minute first
            await rows.aupdate(**added)
    row = await rows.select_related("model").afirst()
    if row is not None:
        await events.apublish("requests.update", events.request_minute_payload(row))
