"""Admission: how many requests a web process has running on a model's replicas, and who goes
next when every seat is taken.

A model's seats are its READY replicas' engines' concurrent sequences (`max_num_seqs`, as
their agents say) times GATEWAY_SEATS_PERCENT / 100, shared by the web processes that route to
it. A request that finds a free seat starts at once, at the cost of two counter increments;
the rest wait here, in the gateway, where they can still be ordered: an engine's own queue is
first come, first served, and vLLM's priority policy preempts only for KV space, never for a
waiting request. When a seat frees, it goes to the best class first (interactive, then
batch), and within it to the key with the least service, counted in tokens and divided by the
key's weight: the virtual token counter of "Fairness in Serving Large Language Models" (OSDI
'24), which is work-conserving (a key alone gets every seat but the reserved ones) and lets a
key that was idle bank no credit (`scheduling.lifted_counter`). The last
GATEWAY_RESERVED_SEATS seats go only to keys holding fewer requests than that, so a key that
asks now and then starts at once even while another floods.

What is waiting is bounded (per model, per key): past a bound the answer is 429 queue_full at
once. A request waits at most its deadline (GATEWAY_QUEUE_TIMEOUT_SECONDS, shortened by the
client's X-Queue-Timeout) and is then answered 503 queue_timeout; the engine never sees it.

The queues and counters are this event loop's (its GatewayState's). Each web process admits
up to the model's seats divided by GATEWAY_WEB_PROCESSES: with the load balancer sharing
requests out evenly, each process sees about the same mix of keys, and fairness holds across
them without a round trip per request (docs/routing.md: admission, on what that trades away).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from django.conf import settings
from prometheus_client import Gauge

from agents.models import Placement
from agents.scheduling import lifted_counter, may_start, next_in_line, replica_seats
from controlplane import metrics

log = logging.getLogger(__name__)

# A request's completion tokens count double its prompt's, as in the VTC paper's experiments:
# decoding a token costs an engine more than prefilling one.
COMPLETION_WEIGHT = 2.0


@dataclass(frozen=True)
class Shed:
    """Why a request is refused, or given up, by admission."""

    reason: str  # queue_full, key_queue_full, cold_queue_full, queue_timeout
    message: str
    retry_after: int

    @property
    def status(self) -> int:
        return 503 if self.reason == "queue_timeout" else 429

    @property
    def code(self) -> str:
        return "queue_timeout" if self.reason == "queue_timeout" else "queue_full"


@dataclass(frozen=True)
class Asker:
    """Who asks for a seat: the key (its pk, name and weight) and the class it is admitted in."""

    key: int
    name: str
    weight: int
    priority_class: str
    prompt_tokens: int


class Ticket:
    """One request's seat on a model, given back exactly once; it charges the key's counter
    with the tokens the request was served."""

    def __init__(self, queue: ModelQueue, asker: Asker) -> None:
        self.queue = queue
        self.asker = asker
        self.released = False
        queue.in_flight += 1
        queue.by_key[asker.key] += 1
        queue.charge(asker, asker.prompt_tokens)

    def served(self, completion_tokens: int) -> None:
        """The request's answer is done: its completion tokens go on its key's counter."""
        self.queue.charge(self.asker, completion_tokens * COMPLETION_WEIGHT)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        queue = self.queue
        queue.in_flight -= 1
        queue.by_key[self.asker.key] -= 1
        if queue.by_key[self.asker.key] <= 0:
            del queue.by_key[self.asker.key]
        queue.dispatch()


@dataclass(eq=False)
class Waiter:
    asker: Asker
    seat: asyncio.Future[Ticket]
    since: float = field(default_factory=time.monotonic)


class ModelQueue:
    """One model's seats in this event loop: who holds them, who waits, and each key's counter."""

    def __init__(self, model_id: str) -> None:
        self.model_id = model_id
        self.capacity = 0
        self.in_flight = 0
        self.by_key: Counter[int] = Counter()
        # class → key → its waiting requests, oldest first; keys in the order they began waiting
        self.waiting: dict[str, dict[int, deque[Waiter]]] = {}
        self.queued = 0
        self.queued_by_key: Counter[int] = Counter()
        self.counters: dict[int, float] = {}
        self.floor = 0.0  # the counter of the key served last: where a newcomer starts

    def charge(self, asker: Asker, tokens: float) -> None:
        counter = self.counters.get(asker.key, self.floor) + tokens / asker.weight
        self.counters[asker.key] = counter

    def take_now(self, asker: Asker) -> Ticket | None:
        """A seat at once, when one is free for this key. Called after `dispatch`: a seat still
        free then is one no waiter may take (the reserved ones)."""
        if not may_start(self.in_flight, self.capacity, self.by_key[asker.key],
                         settings.GATEWAY_RESERVED_SEATS):  # fmt: skip
            return None
        self.floor = max(self.floor, self.counters.get(asker.key, self.floor))
        return Ticket(self, asker)

    def full_for(self, asker: Asker) -> Shed | None:
        """The bound a new waiter would pass, if any."""
        retry = settings.GATEWAY_RETRY_AFTER_SECONDS
        if self.queued >= settings.GATEWAY_QUEUE_MAX:
            return Shed("queue_full", f"Too many requests are waiting for `{self.model_id}` "
                        f"({self.queued}); retry in a few seconds.", retry)  # fmt: skip
        if self.queued_by_key[asker.key] >= settings.GATEWAY_QUEUE_MAX_PER_KEY:
            return Shed("key_queue_full", f"This API key has {self.queued_by_key[asker.key]} "
                        f"requests waiting for `{self.model_id}`, its most; retry when some "
                        "have been answered.", retry)  # fmt: skip
        return None

    def enqueue(self, asker: Asker) -> Waiter:
        keys = self.waiting.setdefault(asker.priority_class, {})
        if asker.key not in keys:  # it begins waiting: no credit for the time it was idle
            backlogged = [self.counters.get(key, self.floor) for key in keys]
            self.counters[asker.key] = lifted_counter(
                self.counters.get(asker.key, self.floor), backlogged, self.floor
            )
        waiter = Waiter(asker, asyncio.get_running_loop().create_future())
        keys.setdefault(asker.key, deque()).append(waiter)
        self.queued += 1
        self.queued_by_key[asker.key] += 1
        _queued_gauge(self.model_id, asker).inc()
        return waiter

    def remove(self, waiter: Waiter) -> None:
        """A waiter that leaves without a seat (its deadline passed, its client left)."""
        keys = self.waiting.get(waiter.asker.priority_class, {})
        line = keys.get(waiter.asker.key)
        if line is None or waiter not in line:
            return
        line.remove(waiter)
        self._left(waiter, keys)

    def _left(self, waiter: Waiter, keys: dict[int, deque[Waiter]]) -> None:
        if not keys[waiter.asker.key]:
            del keys[waiter.asker.key]
        self.queued -= 1
        self.queued_by_key[waiter.asker.key] -= 1
        if self.queued_by_key[waiter.asker.key] <= 0:
            del self.queued_by_key[waiter.asker.key]
        _queued_gauge(self.model_id, waiter.asker).dec()

    def dispatch(self) -> None:
        """Give free seats to waiters, best first, while any may take one."""
        while self.queued and self.in_flight < self.capacity:
            order = next_in_line(
                {name: list(keys) for name, keys in self.waiting.items()}, self.counters
            )
            chosen = next(
                ((name, key) for name, key in order
                 if may_start(self.in_flight, self.capacity, self.by_key[key],
                              settings.GATEWAY_RESERVED_SEATS)),
                None,
            )  # fmt: skip
            if chosen is None:
                return
            self._grant(*chosen)

    def _grant(self, priority_class: str, key: int) -> None:
        keys = self.waiting[priority_class]
        waiter = keys[key].popleft()
        self._left(waiter, keys)
        self.floor = max(self.floor, self.counters.get(key, self.floor))
        waiter.seat.set_result(Ticket(self, waiter.asker))
        asker = waiter.asker
        metrics.QUEUE_WAIT.labels(self.model_id, asker.name, asker.priority_class).observe(
            time.monotonic() - waiter.since
        )


def _queued_gauge(model_id: str, asker: Asker) -> Gauge:
    return metrics.QUEUED.labels(model_id, asker.name, asker.priority_class)


class Admission:
    """One event loop's queues (its GatewayState's), one per model."""

    def __init__(self) -> None:
        self.queues: dict[int, ModelQueue] = {}
        self.cold: Counter[int] = Counter()  # requests held for a cold start, per model

    def queue(self, model_pk: int, model_id: str) -> ModelQueue:
        found = self.queues.get(model_pk)
        if found is None:
            found = self.queues[model_pk] = ModelQueue(model_id)
        return found

    def seats(self, placements: Sequence[Placement], web_processes: int) -> int:
        """The model's seats that this web process may fill."""
        total = sum(
            replica_seats(p.max_num_seqs, settings.GATEWAY_SEATS_PERCENT / 100,
                          settings.GATEWAY_UNKNOWN_MAX_NUM_SEQS)
            for p in placements
        )  # fmt: skip
        return max(1, total // max(1, web_processes)) if placements else 0

    def enter(self, queue: ModelQueue, asker: Asker, capacity: int) -> Ticket | Shed | Waiter:
        """A seat now, a refusal now, or a place in line (`wait` it)."""
        queue.capacity = capacity
        queue.dispatch()  # seats a new replica brought go to those already waiting
        ticket = queue.take_now(asker)
        if ticket is not None:
            return ticket
        shed = queue.full_for(asker)
        if shed is not None:
            metrics.SHED.labels(queue.model_id, shed.reason).inc()
            return shed
        return queue.enqueue(asker)

    async def wait(self, queue: ModelQueue, waiter: Waiter, seconds: float) -> Ticket | Shed:
        """The waiter's seat, or queue_timeout once `seconds` pass; a waiter whose
        client leaves (cancelled) leaves the line, and a seat it was given goes back."""
        try:
            async with asyncio.timeout(seconds):
                return await asyncio.shield(waiter.seat)
        except TimeoutError:
            if waiter.seat.done():  # granted as the deadline passed: it is served
                return waiter.seat.result()
            queue.remove(waiter)
            metrics.SHED.labels(queue.model_id, "queue_timeout").inc()
            return Shed(
                "queue_timeout",
                f"Every replica of `{queue.model_id}` stayed busy for the {seconds:g} s this "
                "request could wait; retry later.",
                settings.GATEWAY_RETRY_AFTER_SECONDS,
            )
        except asyncio.CancelledError:
            if waiter.seat.done() and not waiter.seat.cancelled():
                waiter.seat.result().release()
            else:
                queue.remove(waiter)
            raise

    def enter_cold(self, model_pk: int, model_id: str) -> Shed | None:
        """Count a request held for a cold start, or refuse it past GATEWAY_COLD_QUEUE_MAX."""
        if self.cold[model_pk] >= settings.GATEWAY_COLD_QUEUE_MAX:
            metrics.SHED.labels(model_id, "cold_queue_full").inc()
            return Shed("cold_queue_full", f"Too many requests are waiting for `{model_id}` "
                        "to start; retry in a few seconds.",
                        settings.GATEWAY_RETRY_AFTER_SECONDS)  # fmt: skip
        self.cold[model_pk] += 1
        return None

    def leave_cold(self, model_pk: int) -> None:
        self.cold[model_pk] -= 1
        if self.cold[model_pk] <= 0:
            del self.cold[model_pk]
