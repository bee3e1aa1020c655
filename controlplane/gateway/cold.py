"""The cold path: a request that no READY replica answered, held until one serves.

The request counts among its model's cold-start waiters (bounded: `join_cold`), starts or
joins the model's load (controlplane.gateway.coldstart), then takes a seat like a warm
request and tries the new replica; a replica that fails sends it back to waiting, after a
pause. A stream hears progress comments meanwhile, and a keep-alive comment at least every
KEEPALIVE_SECONDS.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpResponse, StreamingHttpResponse

from agents.choices import LoadEventKind
from agents.faults import Fault
from agents.models import LoadEvent, Placement
from controlplane.gateway import coldstart, upstream
from controlplane.gateway.admission import Shed, Waiter
from controlplane.gateway.job import (
    Cleanup,
    Generation,
    Job,
    Opened,
    engine_busy,
    error_message,
    generation,
    not_ready,
    shed,
    told,
    without_lora,
)
from controlplane.gateway.warm import answer_chunks, relay, try_replica

if TYPE_CHECKING:
    from controlplane.gateway.router import Router

# A waiting stream says something this often, or proxies on the way time it out.
KEEPALIVE_SECONDS = 10.0
# A cold request whose replica failed waits this long before it asks again, doubling each time.
_COLD_RETRY_PAUSE_SECONDS = 0.25


class Refused(Exception):
    """Admission refused a cold request its seat (its bounds, its deadline)."""

    def __init__(self, shed: Shed) -> None:
        super().__init__(shed.message)
        self.shed = shed


async def serve_cold(
    router: Router, job: Job, tried: set[Generation], deadline: float
) -> HttpResponse | StreamingHttpResponse:
    """Held until a replica serves (loading the model when none does), within the cold
    queue's bound; the request's seat, if it had one, is no use to it meanwhile."""
    job.release_seat()
    job.record.start = "cold"
    refused = join_cold(router, job)
    if refused is not None:
        return shed(refused)
    if job.stream:
        cleanup = Cleanup()
        cleanup.add(job.leave_cold)  # a stream closed before its wait began
        return upstream.sse_response(
            cold_stream(router, job, tried, deadline, cleanup), job.record, job.api,
            cleanup=cleanup,
        )  # fmt: skip
    try:
        opened = await open_cold(router, job, tried, deadline, None)
    except coldstart.ColdStartFailed as exc:
        return not_ready(told(job, exc), exc.code)
    except Refused as no_seat:
        return shed(no_seat.shed)
    if isinstance(opened, HttpResponse):
        return opened
    return await relay(router, opened, job, cold=True)


def join_cold(router: Router, job: Job) -> Shed | None:
    """Count the request among its model's cold-start waiters, or the refusal past their
    bound."""
    admission, pk = router.state.admission, job.target.pk
    refused = admission.enter_cold(pk, job.target.model_id)
    if refused is not None:
        job.record.shed = True
        return refused
    job.cold_place = lambda: admission.leave_cold(pk)
    return None


async def open_cold(
    router: Router,
    job: Job,
    tried: set[Generation],
    deadline: float,
    on_progress: Callable[[str], None] | None,
) -> Opened | HttpResponse:
    """Wait for a READY replica (loading the model if none is), then try it; a replica that
    fails sends the request back to waiting, after a pause that doubles with each failure
    (a replica whose engine hangs would otherwise be reloaded and fail again at once).
    Raises ColdStartFailed at the deadline. The request leaves the cold start's waiters
    (`Job.leave_cold`) however the wait ends."""
    try:
        return await _wait_and_try(router, job, tried, deadline, on_progress)
    finally:
        job.leave_cold()


async def _wait_and_try(
    router: Router,
    job: Job,
    tried: set[Generation],
    deadline: float,
    on_progress: Callable[[str], None] | None,
) -> Opened | HttpResponse:
    failures = 0
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise coldstart.ColdStartFailed(
                f"No replica of `{job.model.model_id}` could answer within "
                f"{settings.COLD_START_TIMEOUT_SECONDS} s."
            )
        placement = await coldstart.wait_until_ready(
            router.state.watches, job.target, remaining, on_progress, job.asked
        )
        if job.record.trace is not None and job.record.trace.sampled:  # the cold start's trace
            await _link_cold_start(job, placement)
        job.leave_cold()  # its model serves: from here it waits for a seat, if at all
        router.state.cache.forget_placements(job.target)
        await _cold_seat(router, job, placement, deadline)
        # A replica tried already still reads READY when its failure could not be written
        # (the database is away): it pauses too, rather than spin.
        if generation(placement) not in tried:
            opened = await try_replica(router, placement, job, tried, deadline)
            if isinstance(opened, Opened | HttpResponse):
                return opened
            if opened == Fault.NO_LORA:
                raise coldstart.ColdStartFailed(without_lora(job))
            if opened == Fault.BUSY:  # a batch request: later, not held here meanwhile
                return engine_busy(job)
            if opened == Fault.NO_ROOM:
                tried.discard(generation(placement))  # busy, not failed: ask it again
        failures += 1
        pause = min(_COLD_RETRY_PAUSE_SECONDS * 2 ** (failures - 1), 5.0)
        await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))


async def _cold_seat(router: Router, job: Job, placement: Placement, deadline: float) -> None:
    """A seat for a cold request once its model serves: the cold start's waiters join the
    warm requests' queue, so that a new replica takes its seats' worth of them at once and
    the rest in the fair order. Raises Refused past the queue's bounds or deadline."""
    if job.asker is None or not settings.GATEWAY_ADMISSION:
        return
    if job.ticket is not None and not job.ticket.released:
        return  # held already (its first replica failed; it tries another)
    admission = router.state.admission
    queue = admission.queue(job.target.pk, job.target.model_id)
    placements = await router.replicas(job.target) or [placement]
    capacity = admission.seats(placements, settings.GATEWAY_WEB_PROCESSES)
    entered = admission.enter(queue, job.asker, capacity)
    if isinstance(entered, Waiter):
        job.record.queued = True
        seconds = max(0.0, min(job.queue_timeout, deadline - time.monotonic()))
        entered = await admission.wait(queue, entered, seconds)
    if isinstance(entered, Shed):
        job.record.shed = True
        raise Refused(entered)
    job.take_seat(entered)


async def cold_stream(
    router: Router, job: Job, tried: set[Generation], deadline: float, cleanup: Cleanup
) -> AsyncIterator[bytes]:
    """A cold stream: progress comments while the model loads, then the answer."""
    model_id = job.model.model_id
    yield f": loading {model_id}\n\n".encode()
    progress: asyncio.Queue[str] = asyncio.Queue()
    said: list[str] = []

    def on_progress(text: str) -> None:
        if not said or said[-1] != text:
            said.append(text)
            progress.put_nowait(text)

    waiter = asyncio.ensure_future(open_cold(router, job, tried, deadline, on_progress))
    taken = False  # once the generator holds the waiter's result, it gives it back itself
    cleanup.add(lambda: None if taken else _stop_waiting(waiter))
    heard: asyncio.Future[str] | None = None
    try:
        while not waiter.done():
            heard = asyncio.ensure_future(progress.get())
            done, _ = await asyncio.wait(
                {waiter, heard}, timeout=KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED
            )
            if heard in done:
                yield f": loading {model_id}: {heard.result()}\n\n".encode()
            elif not done:
                yield f": loading {model_id}\n\n".encode()
        taken = True
        opened = waiter.result()
    except coldstart.ColdStartFailed as exc:
        yield job.api.error_event(told(job, exc), code=exc.code)
        return
    except Refused as no_seat:
        yield job.api.error_event(no_seat.shed.message, code=no_seat.shed.code)
        return
    finally:
        if heard is not None:
            heard.cancel()
        if not taken:
            _stop_waiting(waiter)
    if isinstance(opened, HttpResponse):  # the agent refused the request itself
        yield job.api.error_event(error_message(opened.status_code, opened.content))
        return
    cleanup.add(opened.abandon)
    async for chunk in answer_chunks(router, opened, job, cold=True):
        yield chunk


def _stop_waiting(waiter: asyncio.Future[Opened | HttpResponse]) -> None:
    """A client that left stops waiting (the load itself goes on); should the wait have
    opened a replica already (or as it is cancelled), that answer and its claim go back."""
    if waiter.done():
        _abandon_if_opened(waiter)
    else:
        waiter.cancel()
        waiter.add_done_callback(_abandon_if_opened)


def _abandon_if_opened(waiter: asyncio.Future[Opened | HttpResponse]) -> None:
    if waiter.cancelled() or waiter.exception() is not None:
        return
    opened = waiter.result()
    if isinstance(opened, Opened):
        opened.abandon()


async def _link_cold_start(job: Job, placement: Placement) -> None:
    """Link the request's span to the trace of the load that made `placement` serve (agents.
    traces), and note how long it waited."""
    assert job.record.trace is not None
    try:
        found = await sync_to_async(
            LoadEvent.objects.filter(placement=placement, kind=LoadEventKind.LOAD)
            .exclude(trace_id="").order_by("-queued_at").values_list("trace_id", "span_id").first
        )()  # fmt: skip
    except DatabaseError:  # a trace's link is never worth a request: it goes on without
        return
    if found is not None and found not in job.record.trace.links:  # once, however many tries
        job.record.trace.links.append(found)
        job.record.event("replica ready", agent=placement.agent.agent_id)
