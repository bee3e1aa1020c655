"""Waiting for a cold model: start its load (once, fleet-wide) and wait until it serves.

`actions.ensure_placement` gives a READY placement, the load under way, or a new
load. The waiters of one web process share one poller per placement, which reads
its row (by primary key, agent state joined) every `_POLL_SECONDS`: cheap, and the
same with several web processes, SQLite or PostgreSQL. A placement that fails or
whose agent goes away sends its waiters back to `ensure_placement`, which finds
the retry on another agent or says that none is left.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from asgiref.sync import sync_to_async
from django.conf import settings

from agents import actions
from agents.choices import UNROUTABLE_AGENT_STATES, AgentState, LoadTrigger, PlacementState
from agents.models import Agent, Model, Placement

_POLL_SECONDS = 0.1


@dataclass(frozen=True)
class Snapshot:
    """A placement's row as the waiters see it."""

    state: str
    bytes_done: int
    bytes_total: int
    agent_state: str
    error: str
    phase: str = ""

    @property
    def serving(self) -> bool:
        return (
            self.state == PlacementState.READY and self.agent_state not in UNROUTABLE_AGENT_STATES
        )

    @property
    def loading(self) -> bool:
        return (
            self.state in actions.LOADING_STATES and self.agent_state not in UNROUTABLE_AGENT_STATES
        )

    def describe(self) -> str:
        """The phase in words: the agent's own ("verifying", "starting the engine
        (standby)") where it reported one, with the share of bytes while downloading."""
        if self.state == PlacementState.DOWNLOADING:
            phase = self.phase or "downloading"
            if phase == "downloading" and self.bytes_total:
                return f"downloading {min(self.bytes_done / self.bytes_total, 1.0):.0%}"
            return phase
        return self.phase or "starting the engine"


class ColdStartFailed(Exception):
    """No replica will serve in time. Its message is what the client is told: short, and
    nothing of the fleet's insides (agents, store URIs, engine logs); `detail` is the
    operators', for the log."""

    def __init__(self, message: str, detail: str = "", code: str = "model_not_ready") -> None:
        super().__init__(message)
        self.detail = detail or message
        self.code = code  # no_idle_capacity: a batch's load that may take only idle capacity


@dataclass(frozen=True)
class Asked:
    """Why a load would be started, and what it may step down: a request's takes any idle
    model (actions.ensure_placement); a batch's waiting for idle capacity only models idle
    for BATCH_IDLE_EVICT_SECONDS (gateway.batchrun)."""

    trigger: str = LoadTrigger.REQUEST
    min_idle_seconds: float = 0.0


FOR_REQUEST = Asked()


class _Watch:
    """One poller of one placement's row, shared by every waiter of this process."""

    def __init__(self, placement_id: int) -> None:
        self.placement_id = placement_id
        self.snapshot: Snapshot | None = None
        self.changed = asyncio.Condition()
        self.waiters = 0
        self.task: asyncio.Task[None] | None = None

    def ensure_running(self) -> None:
        if self.task is None or self.task.done():
            self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while self.waiters:
            row = await (
                Placement.objects.filter(pk=self.placement_id)
                .values_list("state", "bytes_done", "bytes_total", "agent__state", "error", "phase")
                .afirst()
            )
            snapshot = Snapshot(*row) if row else Snapshot(PlacementState.FAILED, 0, 0, "", "")
            if snapshot != self.snapshot:
                self.snapshot = snapshot
                async with self.changed:
                    self.changed.notify_all()
            await asyncio.sleep(_POLL_SECONDS)


class Watches(dict[int, _Watch]):
    """One event loop's pollers, by placement (controlplane.gateway.state): a poller's task
    and condition belong to that loop. Also its last `ensure_placement` per model, which
    the model's waiters share."""

    def __init__(self) -> None:
        super().__init__()
        self.ensured: dict[tuple[int, Asked], tuple[float, asyncio.Future[Placement]]] = {}


# A waiter asks ensure_placement again this often even while its placement still looks
# like loading: another replica may have become READY meanwhile.
_RECHECK_SECONDS = 5.0


async def _follow(
    watches: Watches,
    placement_id: int,
    deadline: float,
    on_progress: Callable[[str], None] | None,
) -> Snapshot | None:
    """Wait until the placement serves or stops loading, or _RECHECK_SECONDS pass without a
    change (then the last snapshot, still loading); None at the deadline."""
    watch = watches.get(placement_id) or watches.setdefault(placement_id, _Watch(placement_id))
    watch.waiters += 1
    watch.ensure_running()
    try:
        while True:
            snapshot = watch.snapshot
            if snapshot is not None:
                if not snapshot.loading:
                    return snapshot
                if on_progress is not None:
                    on_progress(snapshot.describe())
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            async with watch.changed:
                try:
                    await asyncio.wait_for(
                        watch.changed.wait(), timeout=min(remaining, _RECHECK_SECONDS)
                    )
                except TimeoutError:
                    if watch.snapshot is not None and time.monotonic() < deadline:
                        return watch.snapshot
    finally:
        watch.waiters -= 1
        if not watch.waiters:
            watches.pop(placement_id, None)


_CAPACITY_RECHECK_SECONDS = 0.5


def _retrieved(future: asyncio.Future[Placement]) -> None:
    if not future.cancelled():
        future.exception()  # its waiters may all have left: no "never retrieved" warning


async def _ensure(watches: Watches, model: Model, fresh: bool, asked: Asked) -> Placement:
    """`actions.ensure_placement(model)`, asked once at a time per web process: the waiters
    of one cold start share the call under way, and one answered in the last
    _RECHECK_SECONDS unless `fresh` (each would otherwise take the model's row lock every few
    seconds: a thousand held requests, two hundred locks a second)."""
    found = watches.ensured.get((model.pk, asked))
    if found is not None and found[1].done():
        # A refusal (no capacity, the database away) is never reused: the next may differ.
        failed = found[1].cancelled() or found[1].exception() is not None
        stale = fresh or failed or time.monotonic() - found[0] >= _RECHECK_SECONDS
        found = None if stale else found
    if found is None:
        future = asyncio.ensure_future(
            sync_to_async(actions.ensure_placement)(model, asked.trigger, asked.min_idle_seconds)
        )
        future.add_done_callback(_retrieved)
        found = watches.ensured[(model.pk, asked)] = (time.monotonic(), future)
    return await asyncio.shield(found[1])


async def _degraded_agents_exist() -> bool:
    return await Agent.objects.filter(state=AgentState.DEGRADED).aexists()


async def wait_until_ready(
    watches: Watches,
    model: Model,
    seconds: float,
    on_progress: Callable[[str], None] | None = None,
    asked: Asked = FOR_REQUEST,
) -> Placement:
    """A READY placement of `model`, loading it first if need be; raises ColdStartFailed.

    `watches` are the running loop's pollers. `on_progress` hears a short description
    ("downloading 43%") whenever it changes.
    """
    deadline = time.monotonic() + seconds
    # An agent that missed a heartbeat is DEGRADED until the next one says otherwise, or
    # until enough misses make it OFFLINE: while any is, "no room" may be a blink (a slow
    # heartbeat on a busy host), so the request waits that out instead of failing at once.
    verdict_by = time.monotonic() + settings.HEARTBEAT_INTERVAL_SECONDS * (
        settings.HEARTBEAT_OFFLINE_AFTER + 1
    )
    waited_on_degraded = False
    fresh = False  # a new waiter may take the answer its model's other waiters just had
    while time.monotonic() < deadline:
        try:
            placement = await _ensure(watches, model, fresh, asked)
        except actions.NoCapacity as exc:
            fresh = True
            if exc.idle_only:  # the batch waits for idle capacity, or for its deadline
                raise ColdStartFailed(
                    f"No GPU host has idle capacity for the model `{model.model_id}` now.",
                    detail=str(exc), code="no_idle_capacity",
                ) from None  # fmt: skip
            waiting = min(verdict_by, deadline) - time.monotonic()
            if waiting > 0 and await _degraded_agents_exist():
                waited_on_degraded = True
                await asyncio.sleep(min(_CAPACITY_RECHECK_SECONDS, waiting))
                continue
            if waited_on_degraded:  # a verdict came since that refusal: ask once more
                waited_on_degraded = False
                continue
            told = (
                f"The model `{model.model_id}` could not be started: its loads failed."
                if exc.loads_failed
                else f"No GPU host can take the model `{model.model_id}` now."
            )
            raise ColdStartFailed(told, detail=str(exc)) from None
        fresh = True
        if placement.state != PlacementState.READY:
            snapshot = await _follow(watches, placement.pk, deadline, on_progress)
            if snapshot is None:
                break
            if not snapshot.serving:
                # Failed or gone: ensure_placement says what is next. Slow (still loading):
                # an answer of the last few seconds says as much.
                fresh = not snapshot.loading
                continue
        ready = await Placement.objects.ready_for(model).filter(pk=placement.pk).afirst()
        if ready is not None:
            return ready
    raise ColdStartFailed(
        f"The model `{model.model_id}` did not finish loading within {seconds:.0f} s."
    )
