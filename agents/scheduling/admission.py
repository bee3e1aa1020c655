"""Pure decisions of admission: who may start on a model's engines now, and in what order."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

# Admission classes, best first: a held interactive request always starts before a batch one.
ADMISSION_CLASSES = ("interactive", "batch")


def replica_seats(max_num_seqs: int, factor: float, unknown: int) -> int:
    """How many requests a replica takes at once: its engine's concurrent sequences (`unknown`
    when its agent did not say) times `factor`, at least one. Past them a request would only
    wait in the engine's first-come queue, where the gateway can no longer order it."""
    return max(1, int((max_num_seqs or unknown) * factor))


def may_start(in_flight: int, capacity: int, key_in_flight: int, reserve: int) -> bool:
    """Whether a key's request may take a seat now. The last `reserve` seats are kept for keys
    holding fewer than `reserve` requests: a key that asks now and then starts at once even
    while another floods, since an engine frees a seat only when a running request ends (vLLM
    does not preempt for a waiting request's priority, only for KV space). One key alone
    uses all but `reserve` seats."""
    if in_flight >= capacity:
        return False
    return in_flight < capacity - reserve or key_in_flight < reserve


def lifted_counter(counter: float, backlogged: Sequence[float], floor: float) -> float:
    """A key's virtual-token counter as it joins the queue (VTC, "Fairness in Serving Large
    Language Models", OSDI '24): raised to the least counter among those already waiting (or,
    with none waiting, to the counter last served), so that time spent idle banks no credit
    to spend later against keys that kept sending."""
    return max(counter, min(backlogged) if backlogged else floor)


def next_in_line(
    waiting: Mapping[str, Sequence[int]], counters: Mapping[int, float]
) -> list[tuple[str, int]]:
    """(class, key) of the waiting requests' keys in the order they get the next seat: the
    best class first, and within it the least served (lowest virtual-token counter, ties to
    the key that has waited longest: its order in `waiting`)."""
    order: list[tuple[str, int]] = []
    for name in ADMISSION_CLASSES:
        keys = waiting.get(name, ())
        order.extend((name, key) for key in sorted(keys, key=lambda key: counters.get(key, 0.0)))
    return order
