"""The fault suite's world (tests/e2e/faults.py): the fleet a case works with, the steady mixed
traffic its clients send through the official openai client (what each request saw), and what
a `Fault` is. The faults themselves are in tests/e2e/injectors.py."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import openai

from agents import actions
from agents.models import Model
from nodeagent import tinymodel
from tests.e2e.agent_process import AgentProcess
from tests.e2e.fleet import ControlPlane

CONCURRENCY = 8
MODEL = "org/tiny"
SIM = ["--engine", "sim", "--sim-load-seconds", "0.3", "--sim-ttft-ms", "2", "--sim-tpot-ms", "2"]
CPU_ARGS = [
    "--max-model-len", "512", "--dtype", "float32", "--enforce-eager",
    "--kv-cache-memory-bytes", "64M", "--max-num-seqs", "8", "--shutdown-timeout", "10",
]  # fmt: skip
# The production cache (keys and models 5 s, replicas 1 s): what serves through a database blink.
PLANE_ENV = {"GATEWAY_CACHE_SECONDS": "5"}


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
