"""One object per event loop: asyncio clients belong to the loop that made them.

daphne runs one loop; tests and management commands make others, so each
gets its own, and entries of closed loops are dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

T = TypeVar("T")


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
