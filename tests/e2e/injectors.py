"""The fault suite's faults (tests/e2e/faults.py): how each case prepares its fleet, injects its
fault and heals it: processes killed and restarted (engines, agents, Celery workers, beat, web
replicas), a Redis of the case's own, PostgreSQL stopped and started, haproxy in front of the web
replicas, a model store gone mid-download, and an agent on a host of its own whose link is cut,
slowed or made lossy (tests/e2e/netns.py)."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from django.db import connection

from agents import actions
from agents.choices import LoadEventKind, PlacementState
from agents.models import LoadEvent, Placement
from nodeagent import tinymodel
from nodeagent.store.publish import publish
from tests.azurite import Azurite
from tests.e2e import netns
from tests.e2e.agent_process import ROOT, AgentProcess, engine_python, processes_mentioning
from tests.e2e.fault_world import CPU_ARGS, SIM, World, catalog
from tests.e2e.fleet import serving_on
from tests.support import free_port, http_ok, wait_for


def two_replicas(world: World, first: tuple[str, ...] = (), second: tuple[str, ...] = ()) -> None:
    world.start_agent("gpu-a", *(first or SIM))
    world.start_agent("gpu-b", *(second or SIM))
    serving_on(catalog(world, max_replicas=2), "gpu-a", "gpu-b", seconds=60)


def _two_replicas_by_the_sweep(world: World) -> None:
    """Two replicas that the control plane loads itself (min_replicas): its processes use the
    case's own Redis, which this process's Celery client does not."""
    world.start_agent("gpu-a", *SIM)
    world.start_agent("gpu-b", *SIM)
    model = catalog(world, min_replicas=2, max_replicas=2)
    wait_for(
        lambda: Placement.objects.filter(model=model, state=PlacementState.READY).count() == 2,
        60,
        "two replicas loaded by the sweep",
    )


def _engine_sigkill_prepare(world: World) -> None:
    world.start_agent("cpu-a", "--engine", "vllm", "--engine-python", engine_python())
    world.start_agent("gpu-b", *SIM)
    serving_on(catalog(world, engine_args=CPU_ARGS, max_replicas=2), "cpu-a", "gpu-b", seconds=240)


def _engine_sigkill(world: World) -> None:
    cache = str(world.agents["cpu-a"].cache_dir)
    [(_, group, _)] = [p for p in processes_mentioning(cache) if "api_server" in p[2]]
    os.killpg(group, signal.SIGKILL)


def _agent_signal(signum: int) -> Callable[[World], None]:
    def inject(world: World) -> None:
        agent = world.agents["gpu-a"]
        agent.process.send_signal(signum)
        agent.process.wait(timeout=60)

    return inject


def _restart_gpu_a(world: World) -> None:
    world.restart_agent("gpu-a")


def _cold_with_slow_load(world: World) -> None:
    world.start_agent("gpu-a", "--engine", "sim", "--sim-load-seconds", "4")
    catalog(world)


def _kill_loader_once(kind: str) -> Callable[[World], None]:
    def inject(world: World) -> None:
        started = LoadEvent.objects.filter(kind=kind, started_at__isnull=False)
        wait_for(started.exists, 60, f"a {kind.lower()} task to start")
        world.plane.kill("loader")

    return inject


def _restart(name: str) -> Callable[[World], None]:
    def heal(world: World) -> None:
        world.plane.start(name)
        if name in ("loader", "worker"):
            wait_for(lambda: world.plane.log(name).count("ready.") >= 2, 60, f"{name} ready")
        if name.startswith("web"):
            port = world.plane.commands[name][world.plane.commands[name].index("--port") + 1]
            wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 30, f"{name} ready")

    return heal


def _idle_model_stepping_down(world: World) -> None:
    world.start_agent("gpu-a", *SIM, "--sim-stop-seconds", "4")
    world.start_agent("gpu-b", *SIM)
    serving_on(catalog(world), "gpu-b", seconds=60)
    serving_on(catalog(world, "org/idle"), "gpu-a", seconds=60)


def _unload_then_kill_the_loader(world: World) -> None:
    actions.unload(Placement.objects.get(model__model_id="org/idle"), "NVME_CACHED")
    _kill_loader_once(LoadEventKind.UNLOAD)(world)


def _kill(name: str) -> Callable[[World], None]:
    def inject(world: World) -> None:
        world.plane.kill(name)

    return inject


@contextmanager
def private_redis(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A Redis of the case's own (the machine's is shared), restartable on the same port."""
    port = free_port()
    state: dict[str, Any] = {"url": f"redis://127.0.0.1:{port}/0", "port": port}

    def start() -> None:
        state["process"] = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(tmp_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for(lambda: _redis_answers(port), 10, "the private Redis")

    state["start"] = start
    start()
    try:
        yield state
    finally:
        state["process"].kill()
        state["process"].wait()


def _redis_answers(port: int) -> bool:
    import redis

    try:
        return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
    except redis.RedisError:
        return False


def _redis_env(world: World) -> dict[str, str]:
    state = world.stack.enter_context(private_redis(world.tmp_path))
    world.extra["redis"] = state
    return {"REDIS_URL": state["url"]}


def _redis_down(world: World) -> None:
    world.extra["redis"]["process"].kill()
    world.extra["redis"]["process"].wait()


def _redis_up(world: World) -> None:
    world.extra["redis"]["start"]()


def _postgres(action: str) -> Callable[[World], None]:
    def run(world: World) -> None:
        [version] = os.listdir("/etc/postgresql")
        command = ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action]
        subprocess.run([*command, *(["-m", "fast"] if action == "stop" else [])], check=True)
        if action == "start":
            connection.close()  # this process's own connection died with the server
            wait_for(_database_answers, 30, "PostgreSQL")

    return run


def _database_answers() -> bool:
    from django.db import OperationalError

    try:
        connection.ensure_connection()
    except OperationalError:
        connection.close()
        return False
    return True


@contextmanager
def haproxy(tmp_path: Path, backends: list[str]) -> Iterator[str]:
    """A real load balancer in front of the web replicas: the shipped docker/haproxy config
    (health checks, retries on a failed connection, errors in OpenAI's shape), with the test's
    own ports."""
    port = free_port()
    shipped = (ROOT / "docker" / "haproxy" / "haproxy.cfg").read_text()
    servers = "".join(
        f"    server web{n} {url.removeprefix('http://')} check inter 500 fall 1 rise 2\n"
        for n, url in enumerate(backends)
    )
    text = shipped.replace("bind :8080", f"bind 127.0.0.1:{port}")
    text = text.replace("/etc/haproxy/errors", str(ROOT / "docker" / "haproxy" / "errors"))
    text = re.sub(r"(?m)^    server .*\n", "", text) + servers
    config = tmp_path / "haproxy.cfg"
    config.write_text(text)
    process = subprocess.Popen(
        ["haproxy", "-f", str(config), "-db"],
        stdout=(tmp_path / "haproxy.log").open("wb"), stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        wait_for(lambda: http_ok(f"http://127.0.0.1:{port}/healthz"), 20, "haproxy")
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _stored_model(world: World) -> None:
    azurite = Azurite(world.tmp_path / "azurite", location=world.tmp_path / "blobs").start()
    world.stack.callback(azurite.kill)
    world.extra["azurite"] = azurite
    tiny = tinymodel.build(world.tmp_path / "tiny-published")
    publish(tiny, "azure://models/org/tiny", azurite.environ(), stream=io.StringIO())
    azurite.wait_saved()
    # 0.2 MB/s: the tiny checkpoint takes about 10 s to download.
    args = (*SIM, "--download-limit-mb-s", "0.2", "--download-range-mib", "1")
    world.start_agent("gpu-a", *args, env=azurite.environ())
    catalog(world, source="azure://models/org/tiny")


def _store_gone_mid_download(world: World) -> None:
    downloading = Placement.objects.filter(state=PlacementState.DOWNLOADING, bytes_done__gt=0)
    wait_for(downloading.exists, 60, "the download under way")
    world.extra["azurite"].kill()


def _store_back(world: World) -> None:
    azurite = world.extra["azurite"]
    azurite.start()


# --- network faults: an agent on a host of its own (tests/e2e/netns.py) ------------------------

NET_AGENT = "net-a"


def _network_plane(world: World) -> dict[str, str]:
    """The namespace, made before the control plane, which must accept the agent's Host."""
    link = world.stack.enter_context(netns.linked_namespace())
    world.extra["link"] = link
    return {"ALLOWED_HOSTS": f"localhost,127.0.0.1,{link.host_ip}"}


def _networked_agent(world: World, name: str, *args: str) -> AgentProcess:
    """A node agent inside the namespace. The control plane reaches it, and it the control
    plane, through proxies on the link (delay and loss: `LinkProxy`); both cross the veth."""
    link: netns.Link = world.extra["link"]
    port = free_port()
    web_port = int(world.plane.url.rsplit(":", 1)[1])
    to_agent = netns.LinkProxy("127.0.0.1", free_port(), link.agent_ip, port).start()
    to_plane = netns.LinkProxy(link.host_ip, free_port(), "127.0.0.1", web_port).start()
    world.stack.callback(to_plane.stop)
    world.stack.callback(to_agent.stop)
    world.extra["proxies"] = (to_agent, to_plane)
    home = world.tmp_path / name
    home.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("AGENT_")}
    env.update(TMPDIR=str(home), VLLM_CACHE_ROOT=str(home / "vllm-cache"))
    argv = [
        sys.executable, "-m", "nodeagent", "--agent-id", name, "--host", link.agent_ip,
        "--port", str(port), "--advertise-url", f"http://127.0.0.1:{to_agent.listen_port}",
        "--control-plane-url", f"http://{link.host_ip}:{to_plane.listen_port}",
        "--token", world.plane.token, "--cache-dir", str(home / "agent-cache"), *args,
    ]  # fmt: skip
    log_path = home / "agent.log"
    with log_path.open("wb") as log:
        process = link.run(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    world.stack.callback(_stop, process)
    agent = AgentProcess(process, to_agent_url(to_agent), home / "agent-cache", log_path,
                         world.plane.token)  # fmt: skip
    world.agents[name] = agent
    wait_for(lambda: http_ok(f"{agent.url}/healthz"), 30, f"{name} to answer")
    agent.wait_registered()
    return agent


def to_agent_url(proxy: netns.LinkProxy) -> str:
    return f"http://127.0.0.1:{proxy.listen_port}"


def _stop(process: subprocess.Popen[bytes]) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _served_across_the_link(*args: str) -> Callable[[World], None]:
    """The model served by the agent across the link (max_replicas 1: it alone), another
    agent on this host with room to take it."""

    def prepare(world: World) -> None:
        _networked_agent(world, NET_AGENT, *(args or SIM))
        world.start_agent("gpu-b", *SIM)
        serving_on(catalog(world, max_replicas=1), NET_AGENT, seconds=60)

    return prepare


def _cut(world: World) -> None:
    world.extra["link"].cut()


def _heal(world: World) -> None:
    world.extra["link"].heal()


def _slow_and_lossy(world: World) -> None:
    for proxy in world.extra["proxies"]:
        proxy.delay, proxy.loss = 0.1, 0.05  # 200 ms a round trip, 5% of segments resent


def _fast_again(world: World) -> None:
    for proxy in world.extra["proxies"]:
        proxy.delay, proxy.loss = 0.0, 0.0
