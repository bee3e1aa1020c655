"""Routing, and the one call that serves: `Router.serve`.

`Router.serve` answers a parsed request for a catalog model: on the best READY
replica (warm), or after the model loads (cold: held, with SSE progress comments
for streams). Until the first byte of an answer reaches the client, a replica that
cannot answer (unreachable, draining, model gone or not ready) is marked at once,
for every web process, and the request moves to the next replica, or into the cold
path when none is left. Errors of the request itself (an engine's 400) are the
client's and pass unchanged.

State, per event loop (its GatewayState holds the router): how many requests each
placement has in flight here (the freshest load signal routing has: `claim` pairs
every increment with its decrement), replicas this process saw fail (skipped until
their row is written again: a heartbeat, a new load), and when each model last asked
for another replica.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpResponse, JsonResponse, StreamingHttpResponse

from agents import actions
from agents.faults import Fault
from agents.models import Model, Placement
from agents.scheduling import (
    ReplicaLoad,
    RouteReason,
    choose_adapter_replica,
    choose_cached_replica,
    choose_replica,
    needs_scale_out,
    replica_score,
    session_or,
)
from controlplane import metrics
from controlplane.gateway import actions as gateway_actions
from controlplane.gateway import coldstart, stats, upstream
from controlplane.gateway.admission import Asker, ModelQueue, Shed, Ticket, Waiter
from controlplane.gateway.apis import Api, usage_tokens
from controlplane.gateway.errors import openai_error
from controlplane.gateway.kvfollow import PromptBlocks
from controlplane.gateway.prefix import Prefix, PrefixIndex
from controlplane.gateway.upstream import Meter, ReplicaFailed
from nodeagent.protocol import AdapterRef

if TYPE_CHECKING:
    from controlplane.gateway.state import GatewayState

log = logging.getLogger(__name__)

_SCALE_OUT_EVERY_SECONDS = 5.0
# How long this process remembers a failed replica whose row nobody wrote since: past it, the
# failure could not be written (the database was away) and the replica may be tried again.
_FORGET_FAILED_SECONDS = 60.0
# A waiting stream says something this often, or proxies on the way time it out.
_KEEPALIVE_SECONDS = 10.0
# A cold request whose replica failed waits this long before it asks again, doubling each time.
_COLD_RETRY_PAUSE_SECONDS = 0.25


Generation = tuple[int, object]


def generation(placement: Placement) -> Generation:
    """A replica as one request tries it: the same row written again (a heartbeat that says
    it serves, a new load) is a new try."""
    return placement.pk, placement.updated_at


@dataclass
class Job:
    """One request (a completion, a response, embeddings), validated, for a model the key may
    use."""

    model: Model
    api: Api  # which endpoint: the path upstream, and how its stream reads
    raw: bytes  # the body to send upstream
    user: str | None
    stream: bool
    strip_usage: bool  # the gateway asked for the stream's usage event; it is not the client's
    meter: Meter
    record: stats.RequestRecord
    keep_alive: float | None = None  # seconds the request asked its replica to stay warm
    # For a LoRA adapter (`model` is one): what the agent loads into its base's engine.
    adapter: AdapterRef | None = None
    # The prompt's prefix, for cache-aware routing (None under another policy).
    prefix: Prefix | None = None
    # The prompt as the engines' blocks, for precise routing (None under another policy).
    prompt: PromptBlocks | None = None
    # What the client and the operators' log both name the request by (X-Request-Id).
    request_id: str = ""
    # Who asks for a seat on the model's replicas, and how long it may wait for one
    # (controlplane.gateway.admission); None: admitted without a seat (tests of routing alone).
    asker: Asker | None = None
    queue_timeout: float = 60.0
    ticket: Ticket | None = None  # its seat while it holds one
    # Gives back its place among a cold start's waiters (Admission.enter_cold), once.
    cold_place: Callable[[], None] | None = None
    # Why a load it waits on would be started, and what that load may step down.
    asked: coldstart.Asked = coldstart.FOR_REQUEST
    sequences: int = 1  # its `n`: each takes one of an engine's seats

    def release_seat(self) -> None:
        if self.ticket is not None:
            self.ticket.release()

    def leave_cold(self) -> None:
        leave, self.cold_place = self.cold_place, None
        if leave is not None:
            leave()

    @property
    def target(self) -> Model:
        """The model whose replicas serve the request: an adapter's base, else the model."""
        return self.model.base if self.model.base is not None else self.model


class Claim:
    """One request's share of a placement's in-flight count, given back exactly once."""

    def __init__(self, counts: Counter[int], placement: Placement, model: Model) -> None:
        self.counts = counts
        self.placement_id = placement.pk
        self.gauge = metrics.GATEWAY_IN_FLIGHT.labels(model.model_id, placement.agent.agent_id)
        self.released = False
        counts[self.placement_id] += 1
        self.gauge.inc()

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.gauge.dec()
        self.counts[self.placement_id] -= 1
        if self.counts[self.placement_id] <= 0:
            del self.counts[self.placement_id]


@dataclass
class Opened:
    """A replica that answered: its response with headers read, and the request's claim."""

    placement: Placement
    answer: aiohttp.ClientResponse
    claim: Claim
    meter: Meter

    def abandon(self) -> None:
        """The client is gone (or the answer is done): free the connection and the claim, and
        charge what was spent (nothing more when the usage was said already)."""
        self.answer.close()
        self.claim.release()
        self.meter.settle()


class Refused(Exception):
    """Admission refused a cold request its seat (its bounds, its deadline)."""

    def __init__(self, shed: Shed) -> None:
        super().__init__(shed.message)
        self.shed = shed


class Cleanup:
    """What a streamed response must undo however it ends, even if its generator never runs
    to its `finally` (a client that leaves while the generator waits at a `yield`): Django
    calls the response's closers when the handler is done with it."""

    def __init__(self) -> None:
        self.steps: list[Callable[[], object]] = []

    def add(self, step: Callable[[], object]) -> None:
        self.steps.append(step)

    def __call__(self) -> None:
        steps, self.steps = self.steps, []
        for step in steps:
            step()


class Router:
    """One event loop's routing (its GatewayState's): `state` gives it the session to the
    agents, the cache, the cold-start watches and the loop's background tasks."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.in_flight: Counter[int] = Counter()
        # (placement pk, its row's updated_at) → when this process saw that replica fail. A row
        # written since (a heartbeat, a new load) is another generation, tried afresh.
        self.failed_at: dict[Generation, float] = {}
        self.scale_out_asked: dict[int, float] = {}
        # (replica generation, adapter id) → when this process saw that replica serve the
        # adapter: routing's freshest word until the next heartbeat rewrites the row (and its
        # `adapters`), which is a new generation.
        self.adapter_seen: dict[tuple[Generation, str], float] = {}
        # Which replicas each request prefix was last sent to (cache-aware routing).
        self.prefixes = PrefixIndex.of_mib(settings.GATEWAY_PREFIX_INDEX_MIB)

    # --- state ----------------------------------------------------------------------------------

    def claim(self, placement: Placement, model: Model) -> Claim:
        return Claim(self.in_flight, placement, model)

    def _load(self, placement: Placement) -> ReplicaLoad:
        return ReplicaLoad(
            str(placement.pk),
            self.in_flight[placement.pk],
            placement.requests_waiting,
            placement.kv_cache_usage,
        )

    def scores(self, placements: list[Placement]) -> list[float]:
        return [replica_score(self._load(p)) for p in placements]

    def pick(
        self,
        placements: list[Placement],
        user: str | None,
        adapter_id: str | None = None,
        prefix: Prefix | None = None,
        prompt: PromptBlocks | None = None,
    ) -> tuple[Placement, RouteReason] | None:
        """The replica to try, and why, by GATEWAY_ROUTING_POLICY (agents.scheduling):
        cache_aware, where the request's prefix was last sent unless that replica is too much
        busier than the least loaded; least_loaded; session, the user's own while it is not
        overloaded (the rule cache_aware falls back to). An adapter's request goes to a
        replica that holds the adapter unless those are overloaded; among those, cache_aware
        prefers its prefix's. precise: as cache_aware, by the blocks the engines say they hold
        where any replica's can be read (controlplane.gateway.kvfollow)."""
        if not placements:
            return None
        by_key = {str(p.pk): p for p in placements}
        policy = settings.GATEWAY_ROUTING_POLICY
        # Each replica's run of the request's leading blocks (or chunks), and its home: from
        # the engines' own word (precise), else from where this process sent what.
        matched = self.state.kv.match(prompt, placements) if prompt is not None else None
        if matched is None and prefix is not None and prefix.chunks:
            matched = self.prefixes.match(prefix, by_key), prefix.home
        cached = (
            policy in ("cache_aware", "precise")
            and matched is not None
            and (bool(matched[0]) or matched[1] is not None)
        )
        if adapter_id is None:
            loads = [self._load(p) for p in placements]
            if cached:
                assert matched is not None
                found = choose_cached_replica(
                    loads, matched[0], matched[1], user,
                    balance=settings.GATEWAY_PREFIX_BALANCE,
                    overload=settings.SCALE_OUT_QUEUE_THRESHOLD,
                )  # fmt: skip
                assert found is not None
                return by_key[found[0].key], found[1]
            session = user if policy != "least_loaded" else None
            chosen = choose_replica(loads, session, overload=settings.SCALE_OUT_QUEUE_THRESHOLD)
            assert chosen is not None
            return by_key[chosen.key], session_or(RouteReason.LOAD, chosen, loads, session)
        holds = [self.holds(p, adapter_id) for p in placements]
        holding = [self._load(p) for p, held in zip(placements, holds, strict=True) if held]
        if cached and holding:
            assert matched is not None
            found = choose_cached_replica(
                holding, matched[0], matched[1], None,
                balance=settings.GATEWAY_PREFIX_BALANCE,
            )  # fmt: skip
            if found is not None and found[1] is RouteReason.PREFIX:
                return by_key[found[0].key], found[1]
        others = [self._load(p) for p, held in zip(placements, holds, strict=True) if not held]
        chosen = choose_adapter_replica(
            holding, others, user, overload=settings.SCALE_OUT_QUEUE_THRESHOLD
        )
        assert chosen is not None
        return by_key[chosen.key], session_or(RouteReason.LOAD, chosen, holding + others, user)

    def holds(self, placement: Placement, adapter_id: str) -> bool:
        """Whether the replica's engine holds the adapter, as far as this process knows."""
        return adapter_id in (placement.adapters or {}) or (
            (generation(placement), adapter_id) in self.adapter_seen
        )

    def saw_adapter(self, placement: Placement, adapter_id: str) -> None:
        if len(self.adapter_seen) > 10_000:  # generations pass with each heartbeat: start afresh
            self.adapter_seen.clear()
        self.adapter_seen[generation(placement), adapter_id] = time.monotonic()

    async def replicas(self, model: Model) -> list[Placement]:
        """The model's READY replicas, less those this process saw fail whose rows nobody has
        written since (the cache may still hold them, or the failure could not be written)."""
        placements = await self.state.cache.ready_placements(model)
        if not self.failed_at:
            return placements
        horizon = time.monotonic() - _FORGET_FAILED_SECONDS
        for key in [key for key, at in self.failed_at.items() if at < horizon]:
            del self.failed_at[key]
        return [p for p in placements if generation(p) not in self.failed_at]

    def maybe_scale_out(self, model: Model, placements: list[Placement]) -> None:
        """Ask for another replica when every one is over the queue threshold (no request waits),
        at most once per _SCALE_OUT_EVERY_SECONDS per model."""
        # Requests held for a seat count too: the replicas are full and more keep coming.
        queue = self.state.admission.queues.get(model.pk)
        held = queue.queued / len(placements) if queue is not None and placements else 0.0
        if not needs_scale_out(
            [score + held for score in self.scores(placements)],
            threshold=settings.SCALE_OUT_QUEUE_THRESHOLD,
            replicas=len(placements),
            max_replicas=model.max_replicas,
        ):
            return
        now = time.monotonic()
        if now - self.scale_out_asked.get(model.pk, -1e9) < _SCALE_OUT_EVERY_SECONDS:
            return
        self.scale_out_asked[model.pk] = now
        from controlplane.celery import app

        self.state.in_background(
            asyncio.to_thread(app.send_task, "agents.tasks.scale_out", args=(model.pk,))
        )

    async def _failed(self, placement: Placement, model: Model, failure: ReplicaFailed) -> None:
        """Skip the replica here at once, and have the fleet state say so for everyone."""
        log.warning("replica %s failed before the first byte: %s", placement.pk, failure)
        metrics.FAILOVERS.labels(model.model_id, failure.fault.value).inc()
        self.failed_at[generation(placement)] = time.monotonic()
        self.state.cache.forget_placements(model)
        try:
            await sync_to_async(actions.replica_failed)(
                placement.pk, placement.ready_at, failure.fault, str(failure)
            )
        except DatabaseError:  # the database is away: this process skips it all the same
            log.exception("could not record that replica %s failed", placement.pk)

    # --- serving --------------------------------------------------------------------------------

    async def serve(self, job: Job) -> HttpResponse | StreamingHttpResponse:
        """The request's answer: warm on a seat of a READY replica (held for one while every
        seat is taken), else cold."""
        placements = await self._warm_replicas(job)
        if job.adapter is not None and placements == []:
            return not_ready(_without_lora(job))
        if placements:
            self.maybe_scale_out(job.target, placements)
        placements = placements or []
        try:
            if placements and job.asker is not None and settings.GATEWAY_ADMISSION:
                seated = await self._admit(job, placements)
                if not isinstance(seated, list):
                    return seated  # refused, or a held stream
                placements = seated
            response = await self._serve_seated(job, placements)
        except BaseException:  # the client left (cancelled), or the database is away
            job.release_seat()
            raise
        if isinstance(response, StreamingHttpResponse):
            upstream.on_close(response, job.release_seat)
        else:
            job.release_seat()
        return response

    async def _admit(
        self, job: Job, placements: list[Placement]
    ) -> list[Placement] | HttpResponse | StreamingHttpResponse:
        """A seat for the request (its ticket on `job`) and the replicas to try now; or its
        refusal; or, for a stream that must wait, the held stream."""
        admission = self.state.admission
        queue = admission.queue(job.target.pk, job.target.model_id)
        capacity = admission.seats(placements, settings.GATEWAY_WEB_PROCESSES)
        assert job.asker is not None
        entered = admission.enter(queue, job.asker, capacity)
        if isinstance(entered, Shed):
            job.record.shed = True
            return shed(entered)
        if isinstance(entered, Ticket):
            self._seat(job, entered)
            return placements
        job.record.queued = True
        if job.stream:
            cleanup = Cleanup()
            cleanup.add(job.release_seat)
            # Closed before its generator ran (or at its first yield): its place goes back.
            cleanup.add(lambda: _abandon(queue, entered))
            return upstream.sse_response(
                self._held_stream(job, queue, entered, cleanup), job.record, job.api,
                cleanup=cleanup,
            )  # fmt: skip
        seated = await admission.wait(queue, entered, job.queue_timeout)
        if isinstance(seated, Shed):
            job.record.shed = True
            return shed(seated)
        self._seat(job, seated)
        now = await self._warm_replicas(job)  # as they are after the wait
        if job.adapter is not None and now == []:
            job.release_seat()
            return not_ready(_without_lora(job))
        return now or []

    async def _warm_replicas(self, job: Job) -> list[Placement] | None:
        """The READY replicas that may serve the request; for an adapter, those whose engines
        can load it ([] when replicas serve but none can; None when none serves)."""
        placements = await self.replicas(job.target)
        if job.adapter is not None and placements:
            return self._takes_adapter(job, placements)
        return placements or None

    def _seat(self, job: Job, ticket: Ticket) -> None:
        """The request holds `ticket`; what it is served goes on its key's counter (the
        seat it holds when its usage is known: a cold request holds a second one)."""
        first = job.ticket is None
        job.ticket = ticket
        if not first:
            return
        sink = job.meter.on_usage

        def on_usage(usage: dict[str, Any]) -> None:
            sink(usage)
            if job.ticket is not None:
                job.ticket.served(usage_tokens(usage)[1])

        job.meter.on_usage = on_usage

    async def _cold_seat(self, job: Job, placement: Placement, deadline: float) -> None:
        """A seat for a cold request once its model serves: the cold start's waiters join the
        warm requests' queue, so that a new replica takes its seats' worth of them at once and
        the rest in the fair order. Raises Refused past the queue's bounds or deadline."""
        if job.asker is None or not settings.GATEWAY_ADMISSION:
            return
        if job.ticket is not None and not job.ticket.released:
            return  # held already (its first replica failed; it tries another)
        admission = self.state.admission
        queue = admission.queue(job.target.pk, job.target.model_id)
        placements = await self.replicas(job.target) or [placement]
        capacity = admission.seats(placements, settings.GATEWAY_WEB_PROCESSES)
        entered = admission.enter(queue, job.asker, capacity)
        if isinstance(entered, Waiter):
            job.record.queued = True
            seconds = max(0.0, min(job.queue_timeout, deadline - time.monotonic()))
            entered = await admission.wait(queue, entered, seconds)
        if isinstance(entered, Shed):
            job.record.shed = True
            raise Refused(entered)
        self._seat(job, entered)

    async def _open_warm(
        self, job: Job, placements: list[Placement], tried: set[Generation], deadline: float
    ) -> Opened | HttpResponse | None:
        """The first of the replicas to answer, by routing's order; the agent's refusal of the
        request itself; None when none could (the request goes cold), not_ready when each
        serves but has every adapter slot busy, engine_busy when each had no room for a
        batch-class request."""
        no_room = busy = False
        adapter_id = job.adapter.adapter_id if job.adapter is not None else None
        while picked := self.pick(
            [p for p in placements if generation(p) not in tried], job.user, adapter_id,
            job.prefix, job.prompt,
        ):  # fmt: skip
            placement, reason = picked
            metrics.ROUTING_DECISIONS.labels(job.model.model_id, reason.value).inc()
            opened = await self._try(placement, job, tried, deadline)
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

    async def _serve_seated(
        self, job: Job, placements: list[Placement]
    ) -> HttpResponse | StreamingHttpResponse:
        deadline = time.monotonic() + settings.COLD_START_TIMEOUT_SECONDS
        tried: set[Generation] = set()
        opened = await self._open_warm(job, placements, tried, deadline)
        if isinstance(opened, HttpResponse):
            return opened
        if isinstance(opened, Opened):
            return await self._relay(opened, job, cold=False)
        return await self._serve_cold(job, tried, deadline)

    async def _serve_cold(
        self, job: Job, tried: set[Generation], deadline: float
    ) -> HttpResponse | StreamingHttpResponse:
        """Held until a replica serves (loading the model when none does), within the cold
        queue's bound; the request's seat, if it had one, is no use to it meanwhile."""
        job.release_seat()
        job.record.start = "cold"
        refused = self._join_cold(job)
        if refused is not None:
            return shed(refused)
        if job.stream:
            cleanup = Cleanup()
            cleanup.add(job.leave_cold)  # a stream closed before its wait began
            return upstream.sse_response(
                self._cold_stream(job, tried, deadline, cleanup), job.record, job.api,
                cleanup=cleanup,
            )  # fmt: skip
        try:
            opened = await self._open_cold(job, tried, deadline, None)
        except coldstart.ColdStartFailed as exc:
            return not_ready(_told(job, exc), exc.code)
        except Refused as no_seat:
            return shed(no_seat.shed)
        if isinstance(opened, HttpResponse):
            return opened
        return await self._relay(opened, job, cold=True)

    def _join_cold(self, job: Job) -> Shed | None:
        """Count the request among its model's cold-start waiters, or the refusal past their
        bound."""
        admission, pk = self.state.admission, job.target.pk
        refused = admission.enter_cold(pk, job.target.model_id)
        if refused is not None:
            job.record.shed = True
            return refused
        job.cold_place = lambda: admission.leave_cold(pk)
        return None

    async def _held_stream(
        self, job: Job, queue: ModelQueue, waiter: Waiter, cleanup: Cleanup
    ) -> AsyncIterator[bytes]:
        """A stream held for a seat: comments while it waits, as a cold stream's, then the
        answer (warm, or cold should every replica fail), or the queue's error event."""
        model_id = job.target.model_id
        yield f": queued for {model_id}\n\n".encode()
        seat = asyncio.ensure_future(self.state.admission.wait(queue, waiter, job.queue_timeout))
        # A client that leaves while the stream waits at a yield: its place in line, or the
        # seat it was given meanwhile, goes back.
        cleanup.add(lambda: _give_back(seat))
        try:
            while True:
                done, _ = await asyncio.wait({seat}, timeout=_KEEPALIVE_SECONDS)
                if done:
                    break
                yield f": queued for {model_id}\n\n".encode()
        finally:
            if not seat.done():
                seat.cancel()  # the client left: its place in line (or seat) goes back
        seated = seat.result()
        if isinstance(seated, Shed):
            job.record.shed = True
            yield job.api.error_event(seated.message, code=seated.code)
            return
        self._seat(job, seated)
        deadline = time.monotonic() + settings.COLD_START_TIMEOUT_SECONDS
        tried: set[Generation] = set()
        placements = await self._warm_replicas(job)
        if job.adapter is not None and placements == []:
            yield job.api.error_event(_without_lora(job), code="model_not_ready")
            return
        opened = await self._open_warm(job, placements or [], tried, deadline)
        if isinstance(opened, HttpResponse):  # the agent refused the request itself
            yield job.api.error_event(_error_message(opened.status_code, opened.content))
            return
        if opened is None:
            job.release_seat()
            job.record.start = "cold"
            refused = self._join_cold(job)
            if refused is not None:
                yield job.api.error_event(refused.message, code=refused.code)
                return
            cleanup.add(job.leave_cold)
            async for chunk in self._cold_stream(job, tried, deadline, cleanup):
                yield chunk
            return
        cleanup.add(opened.abandon)
        async for chunk in self._answer_chunks(opened, job, cold=False):
            yield chunk

    def _first_token(self, placement: Placement) -> None:
        """Record the cold start's last phase, time to first token, off the request's path."""
        self.state.in_background(sync_to_async(actions.record_first_token)(placement.pk))

    def _takes_adapter(self, job: Job, placements: list[Placement]) -> list[Placement]:
        """The base replicas whose engines can load the adapter (LoRA on, its rank fits)."""
        rank = job.model.adapter_rank or 0
        return [p for p in placements if p.max_loras and p.max_lora_rank >= rank]

    async def _try(
        self, placement: Placement, job: Job, tried: set[Generation], deadline: float
    ) -> Opened | HttpResponse | Fault | None:
        """The replica's answer; None when it failed (marked, and added to `tried`); NO_ROOM
        when it serves but cannot take this adapter now, BUSY when it had no room for a
        batch-class request in time (either added to `tried`, not marked); the agent's
        refusal of the request itself as an OpenAI error."""
        claim = self.claim(placement, job.model)
        try:
            answer = await upstream.post(
                self.state.session, placement, job.api.value, job.raw, job.stream,
                deadline - time.monotonic(), job.adapter,
                job.asker.priority_class if job.asker is not None else None, job.sequences,
            )  # fmt: skip
            refused = await upstream.refusal(answer)
        except ReplicaFailed as failure:
            claim.release()
            tried.add(generation(placement))
            if failure.fault in (Fault.NO_ROOM, Fault.NO_LORA, Fault.BUSY):  # serves: not marked
                metrics.FAILOVERS.labels(job.model.model_id, failure.fault.value).inc()
                return failure.fault
            await self._failed(placement, job.target, failure)
            return None
        except BaseException:
            # The client left (CancelledError) once the prompt was sent: the engine took it,
            # and the request is charged for it (Meter).
            claim.release()
            job.meter.settle()
            raise
        if refused is not None:
            claim.release()
            return openai_error(refused.status, _refusal_told(job, refused), code=refused.code)
        if job.keep_alive is not None:  # the replica that answers is the one kept warm
            self.state.in_background(
                gateway_actions.keep_replica_alive(placement.pk, job.keep_alive, job.target)
            )
        if job.adapter is not None:
            self.saw_adapter(placement, job.adapter.adapter_id)
        if job.prefix is not None and job.prefix.chunks:  # its engine now caches the prefix
            self.prefixes.record(job.prefix, str(placement.pk))
        return Opened(placement, answer, claim, job.meter)

    async def _open_cold(
        self,
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
            return await self._wait_and_try(job, tried, deadline, on_progress)
        finally:
            job.leave_cold()

    async def _wait_and_try(
        self,
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
                self.state.watches, job.target, remaining, on_progress, job.asked
            )
            job.leave_cold()  # its model serves: from here it waits for a seat, if at all
            self.state.cache.forget_placements(job.target)
            await self._cold_seat(job, placement, deadline)
            # A replica tried already still reads READY when its failure could not be written
            # (the database is away): it pauses too, rather than spin.
            if generation(placement) not in tried:
                opened = await self._try(placement, job, tried, deadline)
                if isinstance(opened, Opened | HttpResponse):
                    return opened
                if opened == Fault.NO_LORA:
                    raise coldstart.ColdStartFailed(_without_lora(job))
                if opened == Fault.BUSY:  # a batch request: later, not held here meanwhile
                    return engine_busy(job)
                if opened == Fault.NO_ROOM:
                    tried.discard(generation(placement))  # busy, not failed: ask it again
            failures += 1
            pause = min(_COLD_RETRY_PAUSE_SECONDS * 2 ** (failures - 1), 5.0)
            await asyncio.sleep(min(pause, max(deadline - time.monotonic(), 0)))

    async def _cold_stream(
        self, job: Job, tried: set[Generation], deadline: float, cleanup: Cleanup
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

        waiter = asyncio.ensure_future(self._open_cold(job, tried, deadline, on_progress))
        taken = False  # once the generator holds the waiter's result, it gives it back itself
        cleanup.add(lambda: None if taken else _stop_waiting(waiter))
        heard: asyncio.Future[str] | None = None
        try:
            while not waiter.done():
                heard = asyncio.ensure_future(progress.get())
                done, _ = await asyncio.wait(
                    {waiter, heard}, timeout=_KEEPALIVE_SECONDS, return_when=asyncio.FIRST_COMPLETED
                )
                if heard in done:
                    yield f": loading {model_id}: {heard.result()}\n\n".encode()
                elif not done:
                    yield f": loading {model_id}\n\n".encode()
            taken = True
            opened = waiter.result()
        except coldstart.ColdStartFailed as exc:
            yield job.api.error_event(_told(job, exc), code=exc.code)
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
            yield job.api.error_event(_error_message(opened.status_code, opened.content))
            return
        cleanup.add(opened.abandon)
        async for chunk in self._answer_chunks(opened, job, cold=True):
            yield chunk

    async def _relay(
        self, opened: Opened, job: Job, cold: bool
    ) -> HttpResponse | StreamingHttpResponse:
        """The replica's answer as the client's: its status, content type and bytes."""
        answer = opened.answer
        if answer.headers.get("Content-Type", "").startswith("text/event-stream"):
            chunks = self._answer_chunks(opened, job, cold)
            return upstream.sse_response(
                chunks, job.record, job.api, status=answer.status, cleanup=opened.abandon
            )
        try:
            return await upstream.read_answer(answer, job.meter)
        finally:
            opened.claim.release()
            if cold:
                self._first_token(opened.placement)

    async def _answer_chunks(self, opened: Opened, job: Job, cold: bool) -> AsyncIterator[bytes]:
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
            yield job.api.error_event(_error_message(answer.status, body))
            return
        scanner = upstream.UsageScanner(job.strip_usage, job.meter, job.api)
        chunks = upstream.relay_chunks(answer, opened.placement.pk, scanner)
        first = True
        try:
            async for chunk in chunks:
                if first and cold:
                    self._first_token(opened.placement)
                first = False
                yield chunk
        finally:
            await chunks.aclose()
            opened.claim.release()


def _told(job: Job, failed: coldstart.ColdStartFailed) -> str:
    """What the client hears of a cold start that failed: its short message and the request
    id; the operators' log has the detail (agents, errors, log tails) under that id."""
    log.warning("request %s: no replica of %s: %s", job.request_id, job.target.model_id,
                failed.detail)  # fmt: skip
    return f"{failed} Retry later; request id {job.request_id}."


# What a client is told of an agent's own refusal of its request (the agent's message may name
# stores, paths and hosts: the operators' log has it, under the request id).
_REFUSALS = {
    "body_too_large": "The request body is over the model server's limit.",
    "bad_request": "The model's server could not read the request.",
}


def _refusal_told(job: Job, refused: upstream.AgentRefusal) -> str:
    log.warning("request %s: %s refused: %s: %s", job.request_id, job.model.model_id,
                refused.code, refused.message)  # fmt: skip
    if refused.code.startswith("adapter_"):
        told = f"The LoRA adapter `{job.model.model_id}` could not be loaded ({refused.code})."
    else:
        told = _REFUSALS.get(
            refused.code, f"The model's server refused the request ({refused.code})."
        )
    return f"{told} Request id {job.request_id}."


def _without_lora(job: Job) -> str:
    return (
        f"Every replica of `{job.target.model_id}` runs without LoRA, so none can serve its "
        f"adapter `{job.model.model_id}`: its engines start with LoRA when they next load (an "
        "operator may unload one now)."
    )


def _abandon(queue: ModelQueue, waiter: Waiter) -> None:
    """A held request whose client left: out of the line, or its seat back if it got one."""
    if not waiter.seat.done():
        queue.remove(waiter)
    else:
        waiter.seat.result().release()


def _give_back(seat: asyncio.Future[Ticket | Shed]) -> None:
    """A held stream's wait for a seat, ended: cancelled if it goes on, its seat released if
    it got one (a seat the request took is released again harmlessly: once only)."""
    if not seat.done():
        seat.cancel()
    elif not seat.cancelled() and seat.exception() is None:
        seated = seat.result()
        if isinstance(seated, Ticket):
            seated.release()


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


def _error_message(status: int, body: bytes) -> str:
    try:
        error = json.loads(body).get("error")
        message = error.get("message") if isinstance(error, dict) else error
    except (ValueError, AttributeError):
        message = None
    return f"The model's server answered {status}: {message or body[:200].decode(errors='replace')}"


def shed(refused: Shed) -> JsonResponse:
    """Admission's refusal in OpenAI's shape: 429 queue_full, 503 queue_timeout."""
    response = openai_error(refused.status, refused.message, code=refused.code)
    response["Retry-After"] = str(refused.retry_after)
    return response


def engine_busy(job: Job) -> JsonResponse:
    """A batch-class request that found no room on its replicas' engines: their seats serve
    other requests now (nodeagent.batchgate). It did not run; the batch sends it later."""
    refused = openai_error(
        503, f"Every replica of `{job.target.model_id}` is busy with other requests: "
        "batch-class requests wait for free seats; try again later.", code="engine_busy",
    )  # fmt: skip
    refused["Retry-After"] = "5"
    return refused


def not_ready(message: str, code: str = "model_not_ready") -> JsonResponse:
    response = openai_error(503, message, code=code)
    response["Retry-After"] = str(settings.GATEWAY_RETRY_AFTER_SECONDS)
    return response
