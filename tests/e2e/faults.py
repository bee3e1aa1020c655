"""The fault suite: steady mixed traffic through the official openai client while one fault at a
time hits a real fleet (daphne, both Celery workers, beat, node agents, PostgreSQL, Redis).

Each `Fault` prepares its fleet, injects the fault, and heals it. `run_fault` drives traffic
throughout (streams and plain requests, `CONCURRENCY` clients) and reports what clients saw:
requests sent, failed while the fault lasted, failed after it healed, whether every error had
OpenAI's shape, and whether anything was left stuck (a load or unload pending, a placement in
a transient state). tests/e2e/test_faults.py asserts on the reports; bench/faults.py prints
them. Every wait is bounded, and each case stops by itself.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import openai
from django.db import connection

from agents import actions
from agents.choices import AgentState, LoadEventKind, LoadOutcome, PlacementState
from agents.models import Agent, LoadEvent, Model, Placement
from nodeagent import tinymodel
from nodeagent.store.publish import publish
from tests.azurite import Azurite
from tests.e2e import netns
from tests.e2e.agent_process import ROOT, AgentProcess, engine_python, processes_mentioning
from tests.e2e.fleet import ControlPlane, running_control_plane, serving_on
from tests.factories import make_api_key
from tests.support import free_port, http_ok, wait_for

CONCURRENCY = 8
MODEL = "org/tiny"
SIM = ["--engine", "sim", "--sim-load-seconds", "0.3", "--sim-ttft-ms", "2", "--sim-tpot-ms", "2"]
CPU_ARGS = [
    "--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
    "--kv-cache-memory-bytes", "64M", "--max-num-seqs", "8", "--shutdown-timeout", "10",
]  # fmt: skip
# The production cache (keys and models 5 s, replicas 1 s): what serves through a database blink.
PLANE_ENV = {"GATEWAY_CACHE_SECONDS": "5"}
TRANSIENT = (
    PlacementState.DOWNLOADING,
    PlacementState.LOADING_TO_GPU,
    PlacementState.UNLOADING,
)


# --- traffic ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sent:
    """One request as its client saw it."""

    at: float
    ended: float
    stream: bool
    error: str = ""  # empty: answered in full
    shaped: bool = True  # an error in OpenAI's shape (or a connection that failed: no body)

    @property
    def ok(self) -> bool:
        return not self.error


# vLLM's extension: the random tiny checkpoint may end at once otherwise (an empty answer).
_EXACTLY_MAX_TOKENS = {"ignore_eos": True}


def _shaped(body: object) -> bool:
    return isinstance(body, dict) and isinstance(body.get("message"), str) and "code" in body


class Traffic:
    """`CONCURRENCY` clients, each sending a stream and then a plain chat request, over and over,
    until stopped. Each keeps its own openai client (its own connections)."""

    def __init__(self, base_url: str, raw_key: str, model_id: str) -> None:
        self.base_url, self.raw_key, self.model_id = base_url, raw_key, model_id
        self.sent: list[Sent] = []
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(target=self._client, args=(n,), daemon=True)
            for n in range(CONCURRENCY)
        ]

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=200)
        alive = [thread for thread in self.threads if thread.is_alive()]
        assert not alive, f"{len(alive)} client(s) still waiting on an answer after 200 s"

    def answered_since(self, since: float) -> int:
        return sum(1 for sent in list(self.sent) if sent.at >= since and sent.ok)

    def _client(self, number: int) -> None:
        client = openai.OpenAI(
            base_url=f"{self.base_url}/v1", api_key=self.raw_key, max_retries=0, timeout=180
        )
        stream = number % 2 == 0
        while not self.stopping.is_set():
            self.sent.append(self._one(client, stream, f"client-{number}"))
            stream = not stream
            self.stopping.wait(0.02)  # about 300 requests a second in all: steady, not a flood

    def _one(self, client: openai.OpenAI, stream: bool, user: str) -> Sent:
        started = time.monotonic()
        messages: Any = [{"role": "user", "content": f"hello from {user}"}]
        try:
            if stream:
                chunks = client.chat.completions.create(
                    model=self.model_id, messages=messages, max_tokens=8, stream=True, user=user,
                    extra_body=_EXACTLY_MAX_TOKENS,
                )  # fmt: skip
                text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            else:
                answer = client.chat.completions.create(
                    model=self.model_id, messages=messages, max_tokens=8, user=user,
                    extra_body=_EXACTLY_MAX_TOKENS,
                )  # fmt: skip
                text = answer.choices[0].message.content or ""
        except openai.APIConnectionError as exc:  # the connection itself failed: no body
            return Sent(started, time.monotonic(), stream, f"connection: {exc}")
        except openai.APIError as exc:
            # The client's text of an error is its message alone: the code (what `may_fail`
            # names, e.g. service_unavailable) goes in front of it.
            said = f"{exc.code}: {exc}" if exc.code else str(exc)
            return Sent(started, time.monotonic(), stream, said, _shaped(exc.body))
        except Exception as exc:  # httpx's own, from a stream cut mid-way (openai lets them by)
            return Sent(started, time.monotonic(), stream, f"connection: {exc!r}")
        if not text:
            return Sent(started, time.monotonic(), stream, "an empty answer")
        return Sent(started, time.monotonic(), stream)


# --- the fleet under test -----------------------------------------------------------------------


@dataclass
class World:
    """What a fault case works with."""

    settings: Any
    tmp_path: Path
    stack: ExitStack
    plane: ControlPlane
    url: str  # where clients send requests (a load balancer in front of web, or web)
    agents: dict[str, AgentProcess] = field(default_factory=dict)
    # How each agent was started, to start it again the same way.
    agent_args: dict[str, tuple[tuple[str, ...], dict[str, str] | None]] = field(
        default_factory=dict
    )
    extra: dict[str, Any] = field(default_factory=dict)

    def start_agent(self, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.agent_args[name] = (args, env)
        self.agents[name] = self.plane.agent(self.stack, self.tmp_path, name, *args, extra_env=env)
        # Its own word: after a restart the row of its last run is there already.
        self.agents[name].wait_registered()

    def restart_agent(self, name: str) -> None:
        """The same agent (id, cache) again, as a host's service manager would start it."""
        args, env = self.agent_args[name]
        self.start_agent(name, *args, env=env)


def catalog(world: World, model_id: str = MODEL, source: str = "", **options: Any) -> Model:
    if not source:
        built = world.tmp_path / "tiny"
        source = (built if built.exists() else tinymodel.build(built)).as_uri()
    model, _ = actions.register_catalog_model(model_id, source, size_bytes=1, **options)
    return model


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


def stuck_rows() -> int:
    """Loads and unloads still pending, and placements still in a transient state."""
    pending = LoadEvent.objects.filter(outcome=LoadOutcome.PENDING).count()
    return pending + Placement.objects.filter(state__in=TRANSIENT).count()


# --- cases ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    name: str
    prepare: Callable[[World], None]
    inject: Callable[[World], None]
    heal: Callable[[World], None]
    # Every request sent during the fault can be answered: then none may fail. Otherwise each
    # failure during it must be one of `may_fail` (substrings of what the client saw).
    answerable: bool
    # The traffic is steady (warm) before the fault; False for faults of a cold start.
    warm: bool = True
    hold_seconds: float = 2.0  # how long the fault lasts before it heals
    web_replicas: int = 1
    plane_env: Callable[[World], dict[str, str]] | None = None  # settings made for the case
    plane_settings: dict[str, str] = field(default_factory=dict)  # and fixed ones
    why: str = ""  # what clients may see during it, for the report
    may_fail: tuple[str, ...] = ()
    netns: bool = False  # it needs a network namespace (root): skipped where there is none
    # Measure how long after the heal the fleet takes to converge (`converged`).
    converge: bool = False
    # An agent whose verdicts (DEGRADED, OFFLINE) are counted while the fault lasts; with
    # `flaps_allowed`, more of them than that fail the case.
    watch: str = ""
    flaps_allowed: int | None = None


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


def heartbeat_interval(fault: Fault) -> float:
    """HEARTBEAT_INTERVAL_SECONDS as the fault's control plane runs with it."""
    from tests.e2e.fleet import FAST

    return float({**FAST, **PLANE_ENV, **fault.plane_settings}["HEARTBEAT_INTERVAL_SECONDS"])


def converged() -> bool:
    """No model above max_replicas among routable READY replicas, the networked agent answering
    its heartbeats, and every model it reports known as its placement."""
    over = [
        model.model_id
        for model in Model.objects.all()
        if Placement.objects.ready_for(model).count() > model.max_replicas
    ]
    agent = Agent.objects.filter(agent_id=NET_AGENT).first()
    return not over and agent is not None and agent.is_routable


_CUT = "failed mid-stream"  # the gateway's error event for a stream whose replica died

FAULTS = [
    Fault("engine_sigkill", _engine_sigkill_prepare, _engine_sigkill, lambda w: None,
          answerable=False, hold_seconds=3, may_fail=(_CUT,),
          why="vLLM's engine killed on one of two replicas: requests fail over to the other, "
              "but a stream already past its first token there is cut"),
    Fault("agent_sigkill", two_replicas, _agent_signal(signal.SIGKILL), _restart_gpu_a,
          answerable=False, may_fail=(_CUT,),
          why="streams open on the killed agent are cut; everything else fails over"),
    Fault("agent_sigterm", two_replicas, _agent_signal(signal.SIGTERM), _restart_gpu_a,
          answerable=True, why="the agent drains: its streams finish, new requests move on"),
    Fault("worker_sigkill_load", _cold_with_slow_load, _kill_loader_once(LoadEventKind.LOAD),
          _restart("loader"), answerable=True, warm=False,
          why="held requests wait; the agent finishes the load and its heartbeat says so"),
    Fault("worker_sigkill_unload", _idle_model_stepping_down, _unload_then_kill_the_loader,
          _restart("loader"), answerable=True,
          why="nothing: the unload ends as the agent did it"),
    Fault("beat_stopped", two_replicas, _kill("beat"), _restart("beat"), answerable=True,
          hold_seconds=4, why="nothing: heartbeats and sweeps pause"),
    Fault("redis_restart", _two_replicas_by_the_sweep, _redis_down, _redis_up, answerable=True,
          hold_seconds=3, plane_env=_redis_env,
          why="rate limits fail open; Celery and the channel layer reconnect"),
    Fault("postgres_restart", two_replicas, _postgres("stop"), _postgres("start"),
          answerable=False, hold_seconds=3, may_fail=("service_unavailable",),
          why="served from the gateway's cache; a request that needs the database gets 503"),
    Fault("web_replica_sigkill", two_replicas, _kill("web2"), _restart("web2"),
          answerable=False, web_replicas=2,
          may_fail=("connection", "The web replica that took this request failed", _CUT),
          why="connections open on the killed replica fail; haproxy sends the rest to the other"),
    Fault("store_gone_mid_download", _stored_model, _store_gone_mid_download, _store_back,
          answerable=True, warm=False, hold_seconds=3,
          why="the download stalls and resumes; held requests wait"),
    # The agent serving the model is cut off for longer than the OFFLINE verdict: new
    # requests fail over (a cold start elsewhere); its open streams wait and finish once the
    # link heals; then one of the two replicas steps down (max_replicas 1).
    Fault("network_partition", _served_across_the_link(), _cut, _heal, answerable=True,
          hold_seconds=6, netns=True, converge=True, watch=NET_AGENT,
          plane_env=_network_plane, plane_settings={"GATEWAY_STREAM_IDLE_SECONDS": "60"},
          why="streams open across the link pause until it heals; new requests fail over"),
    # 200 ms round trips and 5% of segments resent on the agent's link: heartbeats take
    # longer but within HEARTBEAT_TIMEOUT_SECONDS, so its state never flaps.
    Fault("network_delay_loss", _served_across_the_link(), _slow_and_lossy, _fast_again,
          answerable=True, hold_seconds=12, netns=True, watch=NET_AGENT, flaps_allowed=0,
          plane_env=_network_plane,
          plane_settings={"HEARTBEAT_INTERVAL_SECONDS": "2", "HEARTBEAT_TIMEOUT_SECONDS": "2"},
          why="answers across the link are slower; nothing fails, the agent never flaps"),
    # The link cut mid-stream and left cut past GATEWAY_STREAM_IDLE_SECONDS: streams open
    # across it end with OpenAI's error event (charged for what was relayed); the rest moves.
    Fault("network_cut_mid_stream", _served_across_the_link(*SIM[:-1], "40"), _cut, _heal,
          answerable=False, hold_seconds=7, netns=True, converge=True, watch=NET_AGENT,
          may_fail=(_CUT,), plane_env=_network_plane,
          plane_settings={"GATEWAY_STREAM_IDLE_SECONDS": "4"},
          why="streams open across the cut link end with an error event after "
              "GATEWAY_STREAM_IDLE_SECONDS; new requests fail over"),
]  # fmt: skip


# --- running a case ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Report:
    name: str
    sent: int
    failed_while_faulted: int
    failed_after_heal: int  # or before the fault: while nothing was faulted
    badly_shaped: int
    stuck: int
    recovery_s: float  # from the heal until a client was served again
    answerable: bool
    errors: tuple[str, ...]
    why: str = ""
    unexpected: int = 0  # failures while faulted of a kind the fault does not explain
    converge_s: float = -1.0  # from the heal until `converged` (-1: not measured)
    flaps: int = 0  # the watched agent's turns into DEGRADED or OFFLINE while faulted
    flaps_allowed: int | None = None

    @property
    def survived(self) -> bool:
        faulted_ok = self.failed_while_faulted == 0 or not self.answerable
        flapped = self.flaps_allowed is not None and self.flaps > self.flaps_allowed
        return faulted_ok and not (
            self.failed_after_heal
            or self.stuck
            or self.badly_shaped
            or self.unexpected
            or flapped
            or self.converge_s == CONVERGE_NEVER
        )

    def line(self) -> str:
        return (
            f"{self.name}: sent {self.sent}, failed while faulted {self.failed_while_faulted}, "
            f"failed after heal {self.failed_after_heal}, badly shaped {self.badly_shaped}, "
            f"unexplained {self.unexpected}, stuck {self.stuck}, recovery {self.recovery_s:.1f} s"
            + (f", converged {self.converge_s:.1f} s" if self.converge_s >= 0 else "")
            + (f", verdicts {self.flaps}" if self.flaps or self.flaps_allowed is not None else "")
            + f" -> {'survived' if self.survived else 'FAILED'}"
        )


def run_fault(fault: Fault, settings: Any, tmp_path: Path) -> Report:
    with ExitStack() as stack:
        world_stub = World(settings, tmp_path, stack, ControlPlane("", tmp_path, ""), "")
        made = fault.plane_env(world_stub) if fault.plane_env else {}
        env = {**PLANE_ENV, **fault.plane_settings, **made}
        plane = stack.enter_context(
            running_control_plane(settings, tmp_path, web_replicas=fault.web_replicas, **env)
        )
        url = plane.url
        if fault.web_replicas > 1:
            url = stack.enter_context(haproxy(tmp_path, plane.web_urls))
        world = World(settings, tmp_path, stack, plane, url, extra=world_stub.extra)
        fault.prepare(world)
        _, raw_key = make_api_key(
            "faults", requests_per_minute=1_000_000, tokens_per_minute=1_000_000_000
        )
        with Traffic(url, raw_key, MODEL) as traffic:
            if fault.warm:
                started = time.monotonic()
                wait_for(lambda: traffic.answered_since(started) >= 16, 60, "steady traffic")
            injected = time.monotonic()
            with Verdicts(fault.watch) as verdicts:
                fault.inject(world)
                time.sleep(fault.hold_seconds)  # the fault lasts: traffic goes on meanwhile
                fault.heal(world)
            healed = time.monotonic()
            converge_s = _converge_time(healed) if fault.converge else -1.0
            wait_for(lambda: traffic.answered_since(healed) >= 32, 180, "traffic after the heal")
        stuck = _settled_or_stuck()
    report = _report(fault, traffic.sent, injected, healed, stuck)
    return replace(
        report, converge_s=converge_s, flaps=verdicts.turns, flaps_allowed=fault.flaps_allowed
    )


CONVERGE_NEVER = float("inf")


def _converge_time(healed: float, seconds: float = 60) -> float:
    """Seconds from the heal until the fleet converged (`converged`); CONVERGE_NEVER if it
    did not within `seconds`."""
    with contextlib.suppress(AssertionError):
        wait_for(converged, seconds, "the fleet to converge", interval=0.05)
        return time.monotonic() - healed
    return CONVERGE_NEVER


class Verdicts:
    """Counts the turns of one agent's state into DEGRADED or OFFLINE while it runs (a thread
    reading the row every 0.1 s)."""

    def __init__(self, agent_id: str) -> None:
        self.agent_id = agent_id
        self.turns = 0
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> Verdicts:
        if self.agent_id:
            self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        if self.agent_id:
            self.thread.join(timeout=10)

    def _watch(self) -> None:
        bad = {AgentState.DEGRADED, AgentState.OFFLINE}
        last = None
        try:
            while not self.stopping.wait(0.1):
                state = Agent.objects.filter(agent_id=self.agent_id).values_list(
                    "state", flat=True
                ).first()  # fmt: skip
                if state in bad and last not in bad:
                    self.turns += 1
                last = state
        finally:
            connection.close()


def _settled_or_stuck(seconds: float = 60) -> int:
    """Wait (bounded) for every load and unload to end; what is left is stuck."""
    with contextlib.suppress(AssertionError):
        wait_for(lambda: stuck_rows() == 0, seconds, "every step to settle")
    return stuck_rows()


def _report(fault: Fault, sent: list[Sent], injected: float, healed: float, stuck: int) -> Report:
    during = [s for s in sent if s.at >= injected - 0.5 and s.at < healed and not s.ok]
    # A request that began before the fault and failed with it counts as failed while faulted.
    during += [s for s in sent if s.at < injected - 0.5 and not s.ok and s.ended >= injected]
    before = [s for s in sent if s.ended < injected and not s.ok]
    after = [s for s in sent if s.at >= healed and not s.ok]
    failures = [s for s in sent if not s.ok]
    served_again = min((s.ended for s in sent if s.ok and s.ended >= healed), default=healed)
    return Report(
        fault.name,
        len(sent),
        len(during),
        len(after) + len(before),
        sum(1 for s in failures if not s.shaped),
        stuck,
        served_again - healed,
        fault.answerable,
        tuple(sorted({s.error[:160] for s in failures}))[:10],
        fault.why,
        sum(1 for s in during if not any(allowed in s.error for allowed in fault.may_fail)),
    )
