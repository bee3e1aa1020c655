"""The agent's side of a model's life: which state a slot may move to from which.

The control plane has its own table (agents/transitions.py), with the events that move a
placement; both use the same states (`nodeagent.protocol.ModelState`). Every write of
`ModelSlot.state` in the registry and the load pipeline goes through `move`, so a slip
(say, READY straight from DOWNLOADING, skipping the engine) raises instead of being
reported in a heartbeat.
"""

from __future__ import annotations

from typing import Protocol

from nodeagent.protocol import ModelState

M = ModelState

TRANSITIONS: dict[ModelState, frozenset[ModelState]] = {
    # not on the GPU: a load starts (or a sleeping engine wakes), a step down goes further
    M.UNLOADED: frozenset({M.DOWNLOADING, M.READY, M.UNLOADING, M.UNLOADED, M.FAILED}),
    M.DOWNLOADING: frozenset({M.LOADING_TO_GPU, M.FAILED}),
    M.LOADING_TO_GPU: frozenset({M.READY, M.FAILED}),
    # serving: asleep in host RAM (UNLOADED), stopped (UNLOADING), died (FAILED), or
    # replaced by another revision (a new download)
    M.READY: frozenset({M.READY, M.UNLOADED, M.UNLOADING, M.FAILED, M.DOWNLOADING}),
    M.UNLOADING: frozenset({M.UNLOADED, M.FAILED}),
    M.FAILED: frozenset({M.DOWNLOADING, M.UNLOADING, M.UNLOADED, M.FAILED}),
}


class IllegalModelTransition(RuntimeError):
    """A slot write the table does not allow: a bug in the agent, never the caller's."""


class HasState(Protocol):
    model_id: str
    state: ModelState


def move(slot: HasState, to: ModelState) -> None:
    """Set `slot.state` to `to`, or raise IllegalModelTransition (changing nothing)."""
    current = ModelState(slot.state)
    if to not in TRANSITIONS[current]:
        raise IllegalModelTransition(f"{slot.model_id}: {current} cannot become {to}")
    slot.state = to
