"""Routing, and the one call that serves: `Router.serve`.

`Router.serve` answers a parsed request for a catalog model: on the best READY
replica (warm), or after the model loads (cold: held, with SSE progress comments
for streams). Until the first byte of an answer reaches the client, a replica that
cannot answer (unreachable, draining, model gone or not ready) is marked at once,
for every web process, and the request moves to the next replica, or into the cold
path when none is left. Errors of the request itself (an engine's 400) are the
client's and pass unchanged. Here: admission (a seat, or a stream held for one) and the
choice of replica; the two paths live beside it, in controlplane.gateway.warm (try the
READY replicas, relay the answer) and controlplane.gateway.cold (wait for a load), and
the request with what its client is told in controlplane.gateway.job.

State, per event loop (its GatewayState holds the router): how many requests each
placement has in flight here (the freshest load signal routing has: `claim` pairs
every increment with its decrement), replicas this process saw fail (skipped until
their row is written again: a heartbeat, a new load), and when each model last asked
for another replica.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import DatabaseError
from django.http import HttpResponse, StreamingHttpResponse

from agents import actions
from agents.models import Model, Placement
from agents.scheduling import (
    HomeBound,
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
from controlplane.gateway import upstream
from controlplane.gateway.admission import ModelQueue, Shed, Ticket, Waiter
from controlplane.gateway.cold import KEEPALIVE_SECONDS, cold_stream, join_cold, serve_cold
from controlplane.gateway.job import (
    Claim,
    Cleanup,
    Generation,
    Job,
    Opened,
    error_message,
    generation,
    not_ready,
    shed,
    without_lora,
)
from controlplane.gateway.kvfollow import PromptBlocks
from controlplane.gateway.prefix import Prefix, PrefixIndex, Traffic
from controlplane.gateway.upstream import ReplicaFailed
from controlplane.gateway.warm import answer_chunks, open_warm, relay, warm_replicas

if TYPE_CHECKING:
    from controlplane.gateway.state import GatewayState

log = logging.getLogger(__name__)

_SCALE_OUT_EVERY_SECONDS = 5.0
# How long this process remembers a failed replica whose row nobody wrote since: past it, the
# failure could not be written (the database was away) and the replica may be tried again.
_FORGET_FAILED_SECONDS = 60.0


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
        self.traffic = Traffic()

    # --- state ----------------------------------------------------------------------------------

    def claim(self, placement: Placement, model: Model) -> Claim:
        return Claim(self.in_flight, placement, model)

    def _load(self, placement: Placement, now: float | None = None) -> ReplicaLoad:
        key = str(placement.pk)
        return ReplicaLoad(
            key,
            self.in_flight[placement.pk],
            placement.requests_waiting,
            placement.kv_cache_usage,
            placement.max_num_seqs or settings.GATEWAY_UNKNOWN_MAX_NUM_SEQS,
            self.traffic.of(key, now) if now is not None else 0.0,
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
        bound = _home_bound(from_engines=matched is not None)
        if matched is None and prefix is not None and prefix.chunks:
            matched = self.prefixes.match(prefix, by_key), prefix.home
        cached = (
            policy in ("cache_aware", "precise")
            and matched is not None
            and (bool(matched[0]) or matched[1] is not None)
        )
        # Replicas' recent traffic is read only where a home may be bounded by it.
        now = time.monotonic() if cached and bound is not None else None
        if adapter_id is None:
            loads = [self._load(p, now) for p in placements]
            if cached:
                assert matched is not None
                found = choose_cached_replica(
                    loads, matched[0], matched[1], user,
                    balance=settings.GATEWAY_PREFIX_BALANCE,
                    balance_share=_balance_share(),
                    home_bound=bound,
                    overload=settings.SCALE_OUT_QUEUE_THRESHOLD,
                )  # fmt: skip
                assert found is not None
                return by_key[found[0].key], found[1]
            session = user if policy != "least_loaded" else None
            chosen = choose_replica(loads, session, overload=settings.SCALE_OUT_QUEUE_THRESHOLD)
            assert chosen is not None
            return by_key[chosen.key], session_or(RouteReason.LOAD, chosen, loads, session)
        holds = [self.holds(p, adapter_id) for p in placements]
        holding = [self._load(p, now) for p, held in zip(placements, holds, strict=True) if held]
        if cached and holding:
            assert matched is not None
            found = choose_cached_replica(
                holding, matched[0], matched[1], None,
                balance=settings.GATEWAY_PREFIX_BALANCE,
                balance_share=_balance_share(),
                home_bound=bound,
            )  # fmt: skip
            if found is not None and found[1] is RouteReason.PREFIX:
                return by_key[found[0].key], found[1]
        others = [self._load(p) for p, held in zip(placements, holds, strict=True) if not held]
        chosen = choose_adapter_replica(
            holding, others, user, overload=settings.SCALE_OUT_QUEUE_THRESHOLD
        )
        assert chosen is not None
        return by_key[chosen.key], session_or(RouteReason.LOAD, chosen, holding + others, user)

    def sent(self, prefix: Prefix, placement: Placement) -> None:
        """The prefix went to `placement`, whose engine caches it now: the index follows, and
        what was new to it counts as its traffic (HomeBound)."""
        if prefix.chunks:
            fresh = self.prefixes.record(prefix, str(placement.pk))
            self.traffic.add(str(placement.pk), fresh, time.monotonic())

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

    async def replica_failed(
        self, placement: Placement, model: Model, failure: ReplicaFailed
    ) -> None:
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
        placements = await warm_replicas(self, job)
        if job.adapter is not None and placements == []:
            return not_ready(without_lora(job))
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
            job.take_seat(entered)
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
        job.take_seat(seated)
        now = await warm_replicas(self, job)  # as they are after the wait
        if job.adapter is not None and now == []:
            job.release_seat()
            return not_ready(without_lora(job))
        return now or []

    async def _serve_seated(
        self, job: Job, placements: list[Placement]
    ) -> HttpResponse | StreamingHttpResponse:
        deadline = time.monotonic() + settings.COLD_START_TIMEOUT_SECONDS
        tried: set[Generation] = set()
        opened = await open_warm(self, job, placements, tried, deadline)
        if isinstance(opened, HttpResponse):
            return opened
        if isinstance(opened, Opened):
            return await relay(self, opened, job, cold=False)
        return await serve_cold(self, job, tried, deadline)

    async def _held_stream(
        self, job: Job, queue: ModelQueue, waiter: Waiter, cleanup: Cleanup
    ) -> AsyncIterator[bytes]:
        """A stream held for a seat: its head at once, a keep-alive comment every
        KEEPALIVE_SECONDS while it waits, then the answer (warm, or cold should every replica
        fail), or the queue's error event.

        No comment before the first wait is over: a seat usually comes within it, and
        clients that take each read for whole events (vLLM's own load generator strips each
        read and never finds an event boundary again after a lone comment) then see nothing
        but the answer. An empty first chunk sends the head (daphne writes a response's
        head only with a body write; uvicorn at once) and nothing else."""
        model_id = job.target.model_id
        yield b""
        seat = asyncio.ensure_future(self.state.admission.wait(queue, waiter, job.queue_timeout))
        # A client that leaves while the stream waits at a yield: its place in line, or the
        # seat it was given meanwhile, goes back.
        cleanup.add(lambda: _give_back(seat))
        try:
            while True:
                done, _ = await asyncio.wait({seat}, timeout=KEEPALIVE_SECONDS)
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
        job.take_seat(seated)
        deadline = time.monotonic() + settings.COLD_START_TIMEOUT_SECONDS
        tried: set[Generation] = set()
        placements = await warm_replicas(self, job)
        if job.adapter is not None and placements == []:
            yield job.api.error_event(without_lora(job), code="model_not_ready")
            return
        opened = await open_warm(self, job, placements or [], tried, deadline)
        if isinstance(opened, HttpResponse):  # the agent refused the request itself
            yield job.api.error_event(error_message(opened.status_code, opened.content))
            return
        if opened is None:
            job.release_seat()
            job.record.start = "cold"
            refused = join_cold(self, job)
            if refused is not None:
                yield job.api.error_event(refused.message, code=refused.code)
                return
            cleanup.add(job.leave_cold)
            async for chunk in cold_stream(self, job, tried, deadline, cleanup):
                yield chunk
            return
        cleanup.add(opened.abandon)
        async for chunk in answer_chunks(self, opened, job, cold=False):
            yield chunk


def _balance_share() -> float:
    """GATEWAY_PREFIX_BALANCE_PERCENT of a replica's seats, as this web process's share: its
    load scores count only its own requests in flight."""
    return settings.GATEWAY_PREFIX_BALANCE_PERCENT / 100 / settings.GATEWAY_WEB_PROCESSES


def _home_bound(from_engines: bool) -> HomeBound | None:
    """GATEWAY_PREFIX_HOME_BOUND_PERCENT as a bound on new prefixes' homes (0: none), where
    web processes still agree under it: each bounds by the traffic it sent itself, so two
    could choose two homes for one new prefix. Where the match comes from the engines' own
    word (precise), both see the prefix on both replicas after that and follow alike; from
    this process's index, only a lone web process (GATEWAY_WEB_PROCESSES=1) sees it all."""
    percent = settings.GATEWAY_PREFIX_HOME_BOUND_PERCENT
    if not percent or not (from_engines or settings.GATEWAY_WEB_PROCESSES == 1):
        return None
    # Under 100 % of the mean, some replica is always past it: count it as 100.
    return HomeBound(max(percent, 100) / 100, Traffic.MIN_TOTAL)


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
