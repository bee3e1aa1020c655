"""Small helpers shared by the tests."""

from __future__ import annotations

import asyncio
import fcntl
import random
import socket
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# Ports handed out lately, by any test or benchmark process on this machine: a port is only
# bound by its server some time after it is chosen, and meanwhile another process choosing
# would see it free too.
_LEDGER = Path(tempfile.gettempdir()) / "llmfleet-test-ports"
_LEDGER_SECONDS = 600
# Below the kernel's ephemeral range (32768 and up here): the kernel hands those out to every
# listener bound to port 0 (the sim engines an agent runs) and every outgoing connection, and
# either could take a chosen port before its server binds it.
_LOW, _HIGH = 20000, 32000


def free_port() -> int:
    """A loopback port nothing listens on now, that neither the kernel nor another test will
    hand out in the next minutes."""
    return free_port_block(1)


def free_port_block(count: int) -> int:
    """The first of `count` consecutive free ports, chosen as `free_port` chooses one."""
    with open(_LEDGER, "a+") as ledger:
        fcntl.flock(ledger, fcntl.LOCK_EX)
        ledger.seek(0)
        now = time.time()
        recent: dict[int, float] = {}
        for line in ledger.read().split():
            port, _, when = line.partition("@")
            if port.isdigit() and when and now - float(when) < _LEDGER_SECONDS:
                recent[int(port)] = float(when)
        for _ in range(200):
            base = random.randrange(_LOW, _HIGH - count)
            block = range(base, base + count)
            if any(port in recent for port in block) or not _bindable(block):
                continue
            recent.update(dict.fromkeys(block, now))
            ledger.seek(0)
            ledger.truncate()
            ledger.write("".join(f"{port}@{when}\n" for port, when in recent.items()))
            return base
    raise AssertionError(f"no block of {count} free ports")


def _bindable(ports: range) -> bool:
    sockets = []
    try:
        for port in ports:
            sock = socket.socket()
            sockets.append(sock)
            sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    finally:
        for sock in sockets:
            sock.close()
    return True


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
