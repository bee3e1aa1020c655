"""A placement's life in one table: its states, the events that move them, and nothing else.

Every write of `Placement.state` in `agents.actions` goes through `move` (one row in hand)
or `sources`/`target` (a guarded `.update()`), so a transition that is not in `TABLE`
raises `IllegalTransition` instead of being written. The agent's own model states are
`nodeagent.protocol.ModelState`, the same values (tests/agents/test_models.py).

    (no row), UNLOADED, FAILED --load requested--> DOWNLOADING | LOADING_TO_GPU
    DOWNLOADING --download done--> LOADING_TO_GPU
    DOWNLOADING, LOADING_TO_GPU --engine ready--> READY
    DOWNLOADING, LOADING_TO_GPU, READY, UNLOADING --failed--> FAILED
    READY, UNLOADED, FAILED --unload requested--> UNLOADING
    UNLOADING --unload done--> UNLOADED | FAILED (the engine died stopping)
    UNLOADING --unload refused--> READY | UNLOADED (where it was)
    DOWNLOADING, LOADING_TO_GPU, UNLOADING --expired--> FAILED | READY | UNLOADED
    any --agent lost (no longer reported)--> UNLOADED
    any but a pending step --reported (the agent's heartbeat)--> whatever it reports
"""

from __future__ import annotations

from enum import StrEnum

from agents.choices import CacheLevel, PlacementState
from agents.models import Placement

S = PlacementState

LOADING = frozenset({S.DOWNLOADING, S.LOADING_TO_GPU})
# A step the control plane has under way: its task, not a heartbeat, ends it (but see
# `REPORTED_DURING_STEP`).
PENDING = LOADING | {S.UNLOADING}
ALL = frozenset(S)


class Event(StrEnum):
    LOAD_REQUESTED = "load requested"
    DOWNLOAD_DONE = "download done"
    ENGINE_READY = "engine ready"
    FAILED = "failed"
    UNLOAD_REQUESTED = "unload requested"
    UNLOAD_DONE = "unload done"
    UNLOAD_REFUSED = "unload refused"
    EXPIRED = "expired"
    AGENT_LOST = "agent lost"
    REPORTED = "reported"


# event -> (states it may leave, states it may lead to)
TABLE: dict[Event, tuple[frozenset[PlacementState], frozenset[PlacementState]]] = {
    Event.LOAD_REQUESTED: (frozenset({S.UNLOADED, S.FAILED}), LOADING),
    Event.DOWNLOAD_DONE: (frozenset({S.DOWNLOADING}), frozenset({S.LOADING_TO_GPU})),
    Event.ENGINE_READY: (LOADING, frozenset({S.READY})),
    Event.FAILED: (LOADING | {S.READY, S.UNLOADING}, frozenset({S.FAILED})),
    Event.UNLOAD_REQUESTED: (frozenset({S.READY, S.UNLOADED, S.FAILED}), frozenset({S.UNLOADING})),
    Event.UNLOAD_DONE: (frozenset({S.UNLOADING}), frozenset({S.UNLOADED, S.FAILED})),
    Event.UNLOAD_REFUSED: (frozenset({S.UNLOADING}), frozenset({S.READY, S.UNLOADED})),
    Event.EXPIRED: (PENDING, frozenset({S.FAILED, S.READY, S.UNLOADED})),
    Event.AGENT_LOST: (ALL, frozenset({S.UNLOADED})),
    Event.REPORTED: (ALL - PENDING, ALL),
}
# While a step is pending, what a heartbeat may still move it to: a load's own progress and
# outcome (its task may have died: the sweep then closes its LoadEvent), an unload's outcome.
REPORTED_DURING_STEP: dict[PlacementState, frozenset[PlacementState]] = {
    S.DOWNLOADING: frozenset({S.DOWNLOADING, S.LOADING_TO_GPU, S.READY}),
    S.LOADING_TO_GPU: frozenset({S.LOADING_TO_GPU, S.READY}),
    S.UNLOADING: frozenset({S.UNLOADING, S.UNLOADED, S.FAILED}),
}


class IllegalTransition(Exception):
    """A write the table does not allow; nothing was written."""


def allowed(current: PlacementState | None, event: Event, to: PlacementState) -> bool:
    """Whether `event` may move a placement in `current` (None: no row yet) to `to`."""
    leaves, leads_to = TABLE[event]
    if to not in leads_to:
        return False
    if current is None:
        return event in (Event.LOAD_REQUESTED, Event.REPORTED)
    if event == Event.REPORTED and current in PENDING:
        return to in REPORTED_DURING_STEP[current]
    return current in leaves


def move(
    placement: Placement, event: Event, to: PlacementState | None = None, *, new: bool = False
) -> PlacementState:
    """Set `placement.state` as `event` moves it (to `to` where the event has several
    outcomes); raise IllegalTransition, changing nothing, when the table does not allow it.
    `new`: the row does not exist yet."""
    target = to if to is not None else _only_target(event)
    current = None if new else PlacementState(placement.state)
    if not allowed(current, event, target):
        raise IllegalTransition(
            f"placement {placement.pk}: {event} cannot move {current or 'a new one'} to {target}"
        )
    placement.state = target
    return target


def sources(event: Event) -> list[PlacementState]:
    """The states `event` may leave: the guard of a `.update()` that writes it."""
    return sorted(TABLE[event][0])


def target(event: Event) -> PlacementState:
    return _only_target(event)


def _only_target(event: Event) -> PlacementState:
    leads_to = TABLE[event][1]
    if len(leads_to) != 1:
        raise IllegalTransition(f"{event} has several outcomes; name the one meant")
    return next(iter(leads_to))


def loading_state(cache_level: str) -> PlacementState:
    """Where a load starts: DOWNLOADING when the files are not on the agent."""
    return S.DOWNLOADING if cache_level == CacheLevel.NONE else S.LOADING_TO_GPU


def resting_state(cache_level: str) -> PlacementState:
    """Where a placement rests at a level when no step is under way."""
    return S.READY if cache_level == CacheLevel.GPU_RESIDENT else S.UNLOADED
