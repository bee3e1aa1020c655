"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import random
import socket
import time
from collections.abc import Callable


def free_port() -> int:
    """A loopback port nothing listens on now (nor, in practice, in the next moments)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, below the ephemeral range (32768 and up)
    so that outgoing connections made meanwhile do not take them."""
    for _ in range(50):
        base = random.randrange(20000, 32000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
        return base
    raise AssertionError(f"no block of {count} free ports")


def wait_for(
    predicate: Callable[[], bool], timeout: float, what: str, *, interval: float = 0.2
) -> None:
    """Poll until `predicate()` holds; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def until(predicate: Callable[[], object], seconds: float, what: str) -> None:
    """`wait_for` for async tests: polls without blocking the event loop the code under test
    runs on."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {what}")
        await asyncio.sleep(0.02)


def http_ok(url: str, timeout: float = 2) -> bool:
    """Whether `url` answers 200 now (False while nothing listens there yet)."""
    import requests

    try:
        return requests.get(url, timeout=timeout).status_code == 200
    except requests.ConnectionError:
        return False
