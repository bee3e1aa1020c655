"""The warm path: a model's READY replicas, tried in routing's order, and the first answer.

A replica that cannot answer before the first byte is marked failed for every web process
(`Router.replica_failed`) and the next one is tried; one that serves but has no room for
this request now (an adapter slot, a batch-class seat) is passed over without a mark. The
answer goes to the client byte for byte, the request's claim on its replica held until the
last byte.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.http import HttpResponse, StreamingHttpResponse

from agents import actions
from agents.faults import Fault
from agents.models import Placement
from controlplane import metrics
from controlplane.gateway import actions as gateway_actions
from controlplane.gateway import upstream
from controlplane.gateway.errors import openai_error
from controlplane.gateway.job import (
    Generation,
    Job,
    Opened,
    engine_busy,
    error_message,
    generation,
    not_ready,
    refusal_told,
)
from controlplane.gateway.upstream import ReplicaFailed

if TYPE_CHECKING:
    from controlplane.gateway.router import Router


async def warm_replicas(router: Router, job: Job) -> list[Placement] | None:
    """The READY replicas that may serve the request; for an adapter, those whose engines
    can load it ([] when replicas serve but none can; None when none serves)."""
    placements = await router.replicas(job.target)
    if job.adapter is not None and placements:
        return _takes_adapter(job, placements)
    return placements or None


def _takes_adapter(job: Job, placements: list[Placement]) -> list[Placement]:
    """The base replicas whose engines can load the adapter (LoRA on, its rank fits)."""
    rank = job.model.adapter_rank or 0
    return [p for p in placements if p.max_loras and p.max_lora_rank >= rank]


async def open_warm(
    router: Router, job: Job, placements: list[Placement], tried: set[Generation], deadline: float
) -> Opened | HttpResponse | None:
    """The first of the replicas to answer, by routing's order; the agent's refusal of the
    request itself; None when none could (the request goes cold), not_ready when each
    serves but has every adapter slot busy, engine_busy when each had no room for a
    batch-class request."""
    no_room = busy = False
    adapter_id = job.adapter.adapter_id if job.adapter is not None else None
    while picked := router.pick(
        [p for p in placements if generation(p) not in tried], job.user, adapter_id,
        job.prefix, job.prompt,
    ):  # fmt: skip
        placement, reason = picked
        metrics.ROUTING_DECISIONS.labels(job.model.model_id, reason.value).inc()
        job.record.event("routed", agent=placement.agent.agent_id, reason=reason.value,
                         replica=placement.pk)  # fmt: skip
        opened = await try_replica(router, placement, job, tried, deadline)
        if isinstance(opened, HttpResponse | Opened):
            return opened
        no_room = no_room or opened == Fault.NO_ROOM
        busy = busy or opened == Fault.BUSY
    if busy and not no_room:  # a batch request: every replica's seats serve others now
        return engine_busy(job)
    if no_room:  # replicas serve, their adapter slots are busy: soon free, not a cold start
        return not_ready(
            f"Every replica of `{job.target.model_id}` that could serve the adapter "
            f"`{job.model.model_id}` has all its adapter slots serving requests."
        )
    return None


async def try_replica(
    router: Router, placement: Placement, job: Job, tried: set[Generation], deadline: float
) -> Opened | HttpResponse | Fault | None:
    """The replica's answer; None when it failed (marked, and added to `tried`); NO_ROOM
    when it serves but cannot take this adapter now, BUSY when it had no room for a
    batch-class request in time (either added to `tried`, not marked); the agent's
    refusal of the request itself as an OpenAI error."""
    claim = router.claim(placement, job.model)
    try:
        answer = await upstream.post(
            router.state.agents, placement, job.api.value, job.raw, job.stream,
            deadline - time.monotonic(), job.adapter,
            job.asker.priority_class if job.asker is not None else None, job.sequences,
            job.record.trace_headers(),
        )  # fmt: skip
        refused = await upstream.refusal(answer)
    except ReplicaFailed as failure:
        claim.release()
        tried.add(generation(placement))
        job.record.event("failover", agent=placement.agent.agent_id, fault=failure.fault.value)
        if failure.fault in (Fault.NO_ROOM, Fault.NO_LORA, Fault.BUSY):  # serves: not marked
            metrics.FAILOVERS.labels(job.model.model_id, failure.fault.value).inc()
            return failure.fault
        await router.replica_failed(placement, job.target, failure)
        return None
    except BaseException:
        # The client left (CancelledError) once the prompt was sent: the engine took it,
        # and the request is charged for it (Meter).
        claim.release()
        job.meter.settle()
        raise
    if refused is not None:
        claim.release()
        return openai_error(refused.status, refusal_told(job, refused), code=refused.code)
    if job.keep_alive is not None:  # the replica that answers is the one kept warm
        router.state.in_background(
            gateway_actions.keep_replica_alive(placement.pk, job.keep_alive, job.target)
        )
    if job.adapter is not None:
        router.saw_adapter(placement, job.adapter.adapter_id)
    if job.prefix is not None:
        router.sent(job.prefix, placement)
    job.record.note(agent=placement.agent.agent_id, replica=placement.pk)
    return Opened(placement, answer, claim, job.meter)


async def relay(
    router: Router, opened: Opened, job: Job, cold: bool
) -> HttpResponse | StreamingHttpResponse:
    """The replica's answer as the client's: its status, content type and bytes."""
    answer = opened.answer
    if answer.headers.get("Content-Type", "").startswith("text/event-stream"):
        chunks = answer_chunks(router, opened, job, cold)
        return upstream.sse_response(
            chunks, job.record, job.api, status=answer.status, cleanup=opened.abandon
        )
    try:
        return await upstream.read_answer(answer, opened.placement.pk, job.meter)
    finally:
        opened.claim.release()
        if cold:
            _first_token(router, opened.placement)


async def answer_chunks(
    router: Router, opened: Opened, job: Job, cold: bool
) -> AsyncIterator[bytes]:
    answer = opened.answer
    ok = answer.status == 200 and answer.headers.get("Content-Type", "").startswith(
        "text/event-stream"
    )
    if not ok:  # a cold stream whose engine refused the request: the client's error
        try:
            body = await answer.read()
        finally:
            answer.release()
            opened.claim.release()
        yield job.api.error_event(error_message(answer.status, body))
        return
    scanner = upstream.UsageScanner(job.strip_usage, job.meter, job.api)
    chunks = upstream.relay_chunks(answer, opened.placement.pk, scanner)
    first = True
    try:
        async for chunk in chunks:
            if first and cold:
                _first_token(router, opened.placement)
            first = False
            yield chunk
    finally:
        await chunks.aclose()
        opened.claim.release()


def _first_token(router: Router, placement: Placement) -> None:
    """Record the cold start's last phase, time to first token, off the request's path."""
    router.state.in_background(sync_to_async(actions.record_first_token)(placement.pk))
