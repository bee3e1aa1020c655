"""Requests of the `batch` admission class yield to all others on each engine.

The gateway marks a request admitted in the `batch` class (a Batch API line, or a client's
own batch-class request) with PRIORITY_CLASS_HEADER. Every request for an engine passes
this agent, so here, and only here, the number of requests an engine holds is known
exactly, whichever of the control plane's processes sent them. A batch request enters only
while the engine holds fewer than its max_num_seqs less a reserve (`batch_seats`); others
always enter. The reserve's seats are what an interactive request finds free when it
comes: vLLM (0.32) never preempts a running sequence for a waiting one of higher priority
(its scheduler preempts for KV space only), so a request that finds every seat taken waits
for one to end, which is a whole batch line's time.

Batch requests that find no room wait here in arrival order, holding nothing of the
engine's, and enter as requests end. One that waits past its bound is answered 503
`engine_busy` (the gateway tries another replica, and the batch sends the line again
later): what the client of a held batch line would rather have than a stuck connection.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

# vLLM's smaller default max_num_seqs on a GPU (256; 1024 on some cards): the seats assumed
# for an engine whose arguments do not say (nodeagent.engines.standby.max_num_seqs).
UNKNOWN_MAX_NUM_SEQS = 256


def batch_seats(max_num_seqs: int, reserve_percent: float) -> int:
    """How many requests an engine may hold for a batch request to enter: its max_num_seqs
    (UNKNOWN_MAX_NUM_SEQS when 0) less `reserve_percent` of them, at least one seat
    reserved when any percent is, and at least one left, or a batch would never run."""
    seats = max_num_seqs or UNKNOWN_MAX_NUM_SEQS
    reserve = math.ceil(seats * reserve_percent / 100) if reserve_percent > 0 else 0
    return max(seats - reserve, 1)


class EngineBusy(Exception):
    """A batch request waited its bound for room on the engine."""


class BatchGate:
    """One engine's door for batch requests. `held` is the sequences the engine holds now
    (what the agent has in flight for it, each request its `n`); a batch request let in is
    counted in it at once, by `enter_batch` or, for one that waited, by the `leave` that let
    it in, so that two requests ending together never let in more than there is room for."""

    def __init__(self) -> None:
        self.held = 0
        # In arrival order: each waiter's turn and its sequences.
        self.waiting: deque[tuple[asyncio.Future[None], int]] = deque()

    def enter_now(self, sequences: int = 1) -> None:
        """A request of any other class: it enters whatever the engine holds."""
        self.held += sequences

    async def enter_batch(self, seats: int, seconds: float, sequences: int = 1) -> None:
        """Enter as a batch request of `sequences`: at once while the engine holds room for
        them (any request alone on it does) and nobody waits before it; else in turn. Raises
        EngineBusy after `seconds`."""
        if not self.waiting and self._fits(sequences, seats):
            self.held += sequences
            return
        turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.waiting.append((turn, sequences))
        try:
            # asyncio.timeout, not wait_for: Python 3.11's wait_for drops a cancel that
            # comes as the turn does, and the request would go on without its client.
            async with asyncio.timeout(seconds):
                await turn
        except TimeoutError:
            self._give_up(turn, seats, sequences)
            raise EngineBusy from None
        except asyncio.CancelledError:  # the client left while it waited
            self._give_up(turn, seats, sequences)
            raise

    def leave(self, seats: int, sequences: int = 1) -> None:
        """A request ended: the next batch requests in line enter, as many as there is room."""
        self.held -= sequences
        self._let_in(seats)

    def _fits(self, sequences: int, seats: int) -> bool:
        return self.held + sequences <= seats or self.held == 0

    def _let_in(self, seats: int) -> None:
        while self.waiting:
            turn, sequences = self.waiting[0]
            if turn.done():  # given up already
                self.waiting.popleft()
                continue
            if not self._fits(sequences, seats):
                return  # in order: none overtakes the first in line
            self.waiting.popleft()
            self.held += sequences
            turn.set_result(None)

    def _give_up(self, turn: asyncio.Future[None], seats: int, sequences: int) -> None:
        """A waiter that leaves: out of the line, or, if it was let in meanwhile (its turn
        came as its time ran out), its place given on."""
        if turn.done() and not turn.cancelled():
            self.leave(seats, sequences)
            return
        turn.cancel()
        self.waiting = deque(entry for entry in self.waiting if entry[0] is not turn)
        self._let_in(seats)  # it may have been first in line, holding back those behind
