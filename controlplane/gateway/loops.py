"""One object per event loop: asyncio clients belong to the loop that made them.

daphne runs one loop; tests and management commands make others, so each
gets its own, and entries of closed loops are dropped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)


def per_loop(store: dict[asyncio.AbstractEventLoop, T], make: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    if loop not in store:
        for closed in [other for other in store if other.is_closed()]:
            del store[closed]
        store[loop] = make()
    return store[loop]


# Tasks started off a request's path. The event loop keeps only weak references to tasks,
# so this set holds each until it ends.
_background: set[asyncio.Future[object]] = set()


def in_background(work: Awaitable[object]) -> None:
    """Run `work` on the running loop without anyone awaiting it."""
    task = asyncio.ensure_future(work)
    _background.add(task)
    task.add_done_callback(_background.discard)


Closer = Callable[[asyncio.AbstractEventLoop], Awaitable[None]]
_closers: list[Closer] = []


def on_shutdown(closer: Closer) -> Closer:
    """Register what a web process does with its loop's objects as it stops: write what is
    buffered, close what is open. Used as a decorator."""
    _closers.append(closer)
    return closer


async def shutdown() -> None:
    """Every closer for the running loop, each on its own: one that fails stops no other."""
    loop = asyncio.get_running_loop()
    for closer in _closers:
        try:
            await closer(loop)
        except Exception:
            log.exception("%s failed while the web process stopped", closer.__qualname__)
