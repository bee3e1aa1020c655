"""A host of its own for a node agent: a network namespace joined to this machine by a veth
pair, with a link the tests can cut, and a proxy on the link for delay and loss (this kernel
has no netem).

    host (tests, control plane)          namespace llmf-<id>
    10.213.N.1/30  <--- veth --->  10.213.N.2/30  node agent

Safety first: a blackhole route for the whole 10.213.N.0/24 is added before anything else and
stays until everything else is gone, so a cut link (its connected route withdrawn) never sends
the subnet's packets off the machine along the default route. Links are cut with the link
down inside the namespace. Everything made is removed at the end, and a namespace a crashed
run left behind (same prefix) is removed before a new one is made.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import subprocess
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

PREFIX = "llmf-"


def ip(*args: str, namespace: str | None = None, check: bool = True) -> str:
    argv = ["ip", *(["netns", "exec", namespace, "ip"] if namespace else []), *args]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def available() -> str:
    """Why network namespaces cannot be used here ("" when they can)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    try:
        ip("netns", "list")
    except (OSError, RuntimeError) as exc:
        return f"no usable `ip`: {exc}"
    return ""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_leftovers() -> None:
    """What a run that died left behind: its pid and subnet are in its namespace's name
    (`llmf-<pid>-<octet>-<tag>`), so another live run's are never touched."""
    for line in ip("netns", "list").splitlines():
        name = line.split()[0] if line.split() else ""
        parts = name.removeprefix(PREFIX).split("-")
        if not name.startswith(PREFIX) or len(parts) != 3 or not parts[0].isdigit():
            continue
        if not _alive(int(parts[0])):
            ip("netns", "delete", name, check=False)  # its veth pair goes with it
            ip("route", "delete", "blackhole", f"10.213.{parts[1]}.0/24", check=False)


def _free_octet() -> int:
    """A third octet of 10.213.0.0/16 no route of this machine uses yet."""
    used = ip("route", "show", "table", "all")
    for _ in range(100):
        octet = random.randrange(1, 250)
        if f"10.213.{octet}." not in used:
            return octet
    raise RuntimeError("no free 10.213.x.0/24 for a test namespace")


@dataclass
class Link:
    """One namespace and its link to the host."""

    name: str
    host_ip: str
    agent_ip: str
    host_side: str
    agent_side: str

    def cut(self) -> None:
        """The link down, inside the namespace: both ends lose carrier; the host's route to
        the subnet falls back to the blackhole."""
        ip("link", "set", self.agent_side, "down", namespace=self.name)

    def heal(self) -> None:
        ip("link", "set", self.agent_side, "up", namespace=self.name)

    def run(self, argv: list[str], **popen: object) -> subprocess.Popen[bytes]:
        """Start a process inside the namespace."""
        return subprocess.Popen(["ip", "netns", "exec", self.name, *argv], **popen)  # type: ignore[call-overload]


@contextmanager
def linked_namespace() -> Iterator[Link]:
    """A fresh namespace and link; removed, with its routes, whatever happens."""
    _remove_leftovers()
    third = _free_octet()
    subnet = f"10.213.{third}.0/24"
    tag = uuid.uuid4().hex[:6]
    link = Link(
        f"{PREFIX}{os.getpid()}-{third}-{tag}", f"10.213.{third}.1", f"10.213.{third}.2",
        f"lfh{tag}", f"lfn{tag}",
    )  # fmt: skip
    ip("route", "add", "blackhole", subnet)  # before anything can route to the subnet
    try:
        ip("netns", "add", link.name)
        try:
            ip("link", "add", link.host_side, "type", "veth", "peer", "name", link.agent_side)
            ip("link", "set", link.agent_side, "netns", link.name)
            ip("addr", "add", f"{link.host_ip}/30", "dev", link.host_side)
            ip("link", "set", link.host_side, "up")
            ip("addr", "add", f"{link.agent_ip}/30", "dev", link.agent_side, namespace=link.name)
            ip("link", "set", "lo", "up", namespace=link.name)
            ip("link", "set", link.agent_side, "up", namespace=link.name)
            yield link
        finally:
            ip("link", "delete", link.host_side, check=False)
            ip("netns", "delete", link.name, check=False)
    finally:
        ip("route", "delete", "blackhole", subnet, check=False)


@dataclass
class LinkProxy:
    """A TCP proxy in this process (a thread with its own event loop) that forwards
    `listen` to `target`. With `delay` (seconds, each way) and `loss` (a share of chunks), it
    stands for a slow, lossy link: a lost segment costs TCP a retransmission timeout (at least
    200 ms on Linux), so a "lost" chunk arrives that much later; bytes are never dropped,
    as TCP would not drop them either."""

    listen_host: str
    listen_port: int
    target_host: str
    target_port: int
    delay: float = 0.0
    loss: float = 0.0
    retransmit: float = 0.2
    _loop: asyncio.AbstractEventLoop = field(default_factory=asyncio.new_event_loop)
    _server: asyncio.Server | None = None
    _thread: threading.Thread | None = None

    def start(self) -> LinkProxy:
        ready = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._server = self._loop.run_until_complete(
                asyncio.start_server(self._connection, self.listen_host, self.listen_port)
            )
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            others = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)

        if self._thread is not None:
            asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        self._loop.close()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer),
                             return_exceptions=True)  # fmt: skip

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One direction: each chunk delivered `delay` after it arrived (later when "lost"),
        in order, so a late one holds back those behind it as TCP's would; pipelined, so the
        delay is latency, not a cap on throughput."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        loop = asyncio.get_running_loop()

        async def deliver() -> None:
            while True:
                due, chunk = await queue.get()
                if not chunk:
                    return
                await asyncio.sleep(max(due - loop.time(), 0))
                writer.write(chunk)
                await writer.drain()

        sender = asyncio.ensure_future(deliver())
        due = 0.0
        try:
            while chunk := await reader.read(65536):
                wait = self.delay
                if self.loss and random.random() < self.loss:
                    wait += self.retransmit * random.uniform(1, 2)
                due = max(due, loop.time() + wait)
                await queue.put((due, chunk))
            await queue.put((due, b""))
            await sender
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            sender.cancel()
            with contextlib.suppress(OSError, RuntimeError):
                writer.close()
