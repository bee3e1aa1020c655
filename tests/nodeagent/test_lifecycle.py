"""The agent's model states move only as nodeagent/lifecycle.py allows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nodeagent import lifecycle, loading, registry
from nodeagent.lifecycle import IllegalModelTransition
from nodeagent.protocol import ModelState
from nodeagent.slot import ModelSlot

M = ModelState


@pytest.mark.parametrize(
    ("current", "to"),
    [(M.DOWNLOADING, M.READY), (M.UNLOADING, M.READY), (M.LOADING_TO_GPU, M.UNLOADED),
     (M.DOWNLOADING, M.UNLOADING)],
)  # fmt: skip
def test_a_slot_cannot_skip_a_step(current, to):
    slot = ModelSlot("org/m", state=current)
    with pytest.raises(IllegalModelTransition):
        lifecycle.move(slot, to)
    assert slot.state == current


def test_a_load_and_a_step_down_follow_the_table():
    slot = ModelSlot("org/m")
    for state in (M.DOWNLOADING, M.LOADING_TO_GPU, M.READY, M.UNLOADED, M.READY, M.UNLOADING,
                  M.UNLOADED):  # fmt: skip
        lifecycle.move(slot, state)
    assert slot.state == M.UNLOADED


def test_every_state_in_the_table_and_every_write_in_the_registry_through_it():
    assert set(lifecycle.TRANSITIONS) == set(ModelState)
    for module in (registry, loading):  # the load pipeline moves a slot through a load
        source = Path(module.__file__).read_text()
        assert "lifecycle.move(" in source
        assert re.findall(r"\bslot\.state(?:, [\w.]+)* = ", source) == []
