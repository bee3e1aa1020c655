"""The fault suite: steady mixed traffic through the official openai client while one fault at a
time hits a real fleet (daphne, both Celery workers, beat, node agents, PostgreSQL, Redis).

Each `Fault` prepares its fleet, injects the fault, and heals it. `run_fault` drives traffic
throughout (streams and plain requests, `CONCURRENCY` clients) and reports what clients saw:
requests sent, failed while the fault lasted, failed after it healed, whether every error had
OpenAI's shape, and whether anything was left stuck (a load or unload pending, a placement in
a transient state). tests/e2e/test_faults.py asserts on the reports; bench/faults.py prints
them. Every wait is bounded, and each case stops by itself.

Here: the cases (`FAULTS`) and the running of one. The fleet, the traffic and `Fault` are in
tests/e2e/fault_world.py; what each case prepares, injects and heals in tests/e2e/injectors.py.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from django.db import connection

from agents.choices import AgentState, LoadEventKind, LoadOutcome, PlacementState
from agents.models import Agent, LoadEvent, Model, Placement
from tests.e2e.fault_world import MODEL, PLANE_ENV, SIM, Fault, Sent, Traffic, World
from tests.e2e.fleet import ControlPlane, running_control_plane
from tests.e2e.injectors import (
    NET_AGENT,
    _agent_signal,
    _cold_with_slow_load,
    _cut,
    _engine_sigkill,
    _engine_sigkill_prepare,
    _fast_again,
    _heal,
    _idle_model_stepping_down,
    _kill,
    _kill_loader_once,
    _network_plane,
    _postgres,
    _redis_down,
    _redis_env,
    _redis_up,
    _restart,
    _restart_gpu_a,
    _served_across_the_link,
    _slow_and_lossy,
    _store_back,
    _store_gone_mid_download,
    _stored_model,
    _two_replicas_by_the_sweep,
    _unload_then_kill_the_loader,
    haproxy,
    two_replicas,
)
from tests.factories import make_api_key
from tests.support import wait_for

# --- cases ------------------------------------------------------------------------------------

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


TRANSIENT = (
    PlacementState.DOWNLOADING,
    PlacementState.LOADING_TO_GPU,
    PlacementState.UNLOADING,
)


def stuck_rows() -> int:
    """Loads and unloads still pending, and placements still in a transient state."""
    pending = LoadEvent.objects.filter(outcome=LoadOutcome.PENDING).count()
    return pending + Placement.objects.filter(state__in=TRANSIENT).count()


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
