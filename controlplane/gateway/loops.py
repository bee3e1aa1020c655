"""One object per event loop: asyncio clients belong to the loop that made them.

daphne runs one loop; tests and management commands make others, so each
gets its own, and entries of closed loops are dropped.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def per_loop(store: dict[asyncio.AbstractEventLoop, T], make: Callable[[], T]) -> T:
    loop = asyncio.get_running_loop()
    if loop not in store:
        for closed in [other for other in store if other.is_closed()]:
            del store[closed]
        store[loop] = make()
    return store[loop]
