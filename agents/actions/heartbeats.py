"""Heartbeat rounds: agents that answered are refreshed and their placements reconciled
with what they report; agents that did not count a miss."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import asdict, replace
from datetime import UTC, datetime, timedelta

from django.conf import settings
from django.db import DataError, IntegrityError, transaction
from django.utils import timezone

from agents import events, scheduling, transitions
from agents.actions import steps, unloads
from agents.agent_client import HeartbeatResult
from agents.bulk import update_rows
from agents.choices import (
    AgentState,
    CacheLevel,
    PlacementState,
)
from agents.models import Agent, Model, Placement
from agents.scheduling import effective_agent_state, summarize_gpus
from agents.transitions import Event
from agents.validators import url_is_under
from nodeagent.protocol import (
    AdapterStatus,
    ModelStatus,
)

log = logging.getLogger(__name__)


def apply_heartbeats(results: Sequence[HeartbeatResult]) -> None:
    """Write a round of heartbeat polls: agents that answered are refreshed and their
    placements reconciled with what they report; agents that did not count a miss and
    become DEGRADED, then OFFLINE. An answer outside the contract counts as a miss of that
    agent alone, with the reason recorded on it (`Agent.contract_error`).

    Should the round still fail to store (a value the decoder let through but a column
    refuses), each agent is stored on its own, so one agent's answer never holds back the
    others' updates."""
    try:
        with transaction.atomic():
            _apply_heartbeats(results)
    except (DataError, IntegrityError) as exc:
        log.warning("a heartbeat round could not be stored (%s); storing agent by agent", exc)
        for result in results:
            _apply_one(result)


def _apply_one(result: HeartbeatResult) -> None:
    try:
        with transaction.atomic():
            _apply_heartbeats([result])
    except (DataError, IntegrityError) as exc:
        error = f"its heartbeat could not be stored: {exc}".strip()
        with transaction.atomic():
            _apply_heartbeats([replace(result, response=None, error=error, rejected=True)])


def _apply_heartbeats(results: Sequence[HeartbeatResult]) -> None:
    # Row locks from read to write: a load that fails, an unload that finishes or a drain
    # between the two would otherwise be overwritten with what the agent said before it.
    # Lock order: placements, then agents, each by primary key.
    polled = [result.agent_pk for result in results]
    placements: dict[int, dict[int, Placement]] = {}
    for placement in (
        Placement.objects.select_for_update(no_key=True, of=("self",))
        .filter(agent__in=polled)
        .order_by("pk")
    ):
        placements.setdefault(placement.agent_id, {})[placement.model_id] = placement
    agents = {
        agent.pk: agent
        for agent in Agent.objects.select_for_update(no_key=True, of=("self",))
        .filter(pk__in=polled)
        .order_by("pk")
    }
    catalog = dict(Model.objects.values_list("model_id", "pk"))
    now = timezone.now()
    changed_agents: list[Agent] = []
    changed: list[Placement] = []
    created: list[Placement] = []
    for result in results:
        agent = agents.get(result.agent_pk)
        if agent is None:
            continue  # deleted while it was polled
        if result.response is not None and not agent.credential_nonce:
            # Revoked while it was polled: its answer is no longer its to give.
            result = replace(result, response=None, error="its credential was revoked")
        refusal = _refusal(agent, result)
        if refusal:
            result = replace(result, response=None, error=refusal, rejected=True)
        if result.response is None:
            _missed(agent, result.error)
            if result.rejected:
                _rejected(agent, result.error, now)
        else:
            _answered(agent, result, now)
            mine = placements.get(agent.pk, {})
            seen = set()
            polled_at = datetime.fromtimestamp(result.polled_at, UTC)
            for status in result.response.models:
                model_pk = catalog.get(status.model_id)
                if model_pk is None:  # not in the catalog (any more): nothing routes to it
                    if _orphan(status):
                        steps.queue("agents.tasks.unload_orphan", agent.pk, status.model_id)
                    continue
                seen.add(model_pk)
                known = mine.get(model_pk)
                if known is None:
                    new = Placement(agent=agent, model_id=model_pk)
                    _reconcile(new, status, new=True)
                    created.append(new)
                elif known.updated_at < polled_at:  # else written since: that is newer
                    _reconcile(known, status)
                    changed.append(known)
            for model_pk, placement in mine.items():
                fresh = placement.updated_at >= polled_at
                if model_pk not in seen and not fresh and _lost(placement, now):
                    changed.append(placement)
        changed_agents.append(agent)
    update_rows(changed_agents, _HEARTBEAT_AGENT_FIELDS)
    update_rows(changed, _HEARTBEAT_PLACEMENT_FIELDS)
    Placement.objects.bulk_create(created, ignore_conflicts=True)
    events.announce(
        agents=[agent.pk for agent in changed_agents], placements=[p.pk for p in changed]
    )


_HEARTBEAT_AGENT_FIELDS = [
    "state", "reported_state", "version", "gpus", "gpu_name", "gpu_count", "gpu_memory_total",
    "gpu_memory_free", "gpu_utilization", "engine_queue_length", "last_heartbeat_at",
    "heartbeat_failures", "contract_version", "contract_error", "contract_error_at",
    "contract_rejections", "credential_confirmed_at", "updated_at",
]  # fmt: skip


_HEARTBEAT_PLACEMENT_FIELDS = [
    "state", "cache_level", "inference_endpoint_url", "bytes_done", "bytes_total", "phase",
    "kv_cache_hit_rate", "kv_cache_usage", "requests_in_flight", "requests_waiting",
    "last_used_at", "error", "adapters", "max_loras", "max_lora_rank", "max_num_seqs",
    "updated_at",
]  # fmt: skip


def _refusal(agent: Agent, result: HeartbeatResult) -> str:
    """Why an answer that decoded is still not this agent's to give: another agent's id, or an
    endpoint outside its own base URL (where the gateway would post prompts)."""
    beat = result.response
    if beat is None:
        return ""
    if beat.agent_id != agent.agent_id:
        return f"it answered as agent {beat.agent_id!r}"
    for status in beat.models:
        url = status.inference_endpoint_url
        if url and not url_is_under(url, agent.base_url):
            return f"{status.model_id}'s endpoint {url!r} is outside its base URL {agent.base_url}"
    return ""


def _answered(agent: Agent, result: HeartbeatResult, now: datetime) -> None:
    beat = result.response
    assert beat is not None
    gpus = summarize_gpus(beat.gpus)
    reported = AgentState(beat.state) if beat.state in AgentState.values else AgentState.IDLE
    agent.reported_state = reported
    agent.state = effective_agent_state(reported, draining=agent.drained_at is not None)
    agent.version = beat.version
    agent.gpus = [asdict(gpu) for gpu in beat.gpus]
    agent.gpu_name, agent.gpu_count = gpus.name, gpus.count
    agent.gpu_memory_total, agent.gpu_memory_free = gpus.memory_total, gpus.memory_free
    agent.gpu_utilization = gpus.utilization
    agent.engine_queue_length = beat.vllm_queue_length
    agent.contract_version, agent.contract_error = beat.contract, ""
    agent.credential_confirmed_at = agent.credential_confirmed_at or now
    agent.last_heartbeat_at, agent.heartbeat_failures, agent.updated_at = now, 0, now


def _rejected(agent: Agent, error: str, now: datetime) -> None:
    """The agent answered outside the contract: say why on its row (admin, dashboard and
    `llmfleet_agent_contract_rejections_total`)."""
    if agent.contract_error != error:
        log.warning("agent %s answered outside the contract: %s", agent.agent_id, error)
    agent.contract_error, agent.contract_error_at = error[:2000], now
    agent.contract_rejections += 1


def _missed(agent: Agent, error: str) -> None:
    agent.heartbeat_failures += 1
    verdict = scheduling.missed_heartbeat_verdict(
        agent.heartbeat_failures,
        degraded_after=settings.HEARTBEAT_DEGRADED_AFTER,
        offline_after=settings.HEARTBEAT_OFFLINE_AFTER,
    )
    state = effective_agent_state(
        AgentState(agent.reported_state), draining=agent.drained_at is not None, health=verdict
    )
    if state != agent.state:
        log.warning("agent %s is %s: %s", agent.agent_id, state, error)
    agent.state, agent.updated_at = state, timezone.now()


def _reconcile(placement: Placement, status: ModelStatus, *, new: bool = False) -> None:
    """Trust what the agent reports of a model it has, except the state of a step the control
    plane has under way (transitions.REPORTED_DURING_STEP): a pending load ends READY or
    FAILED by its task (the agent may not have started it yet), a pending unload by its task
    too, unless the agent reports the step's own outcome."""
    # The decoder let only the contract's states through: the same values as PlacementState.
    reported = PlacementState(status.cache_state)
    current = None if new else PlacementState(placement.state)
    pending = current in transitions.PENDING
    # What the agent reports as the step's own outcome is the truth even while the step is
    # pending here: its task may have died (the sweep then closes its LoadEvent). An unload's
    # outcome is a level below the one it left (still cache_level while UNLOADING): UNLOADED
    # alone is also what a model in host RAM says before it steps down to disk.
    done = (current in transitions.LOADING and reported == PlacementState.READY) or (
        current == PlacementState.UNLOADING
        and reported in (PlacementState.UNLOADED, PlacementState.FAILED)
        and unloads.below(status.cache_level, placement.cache_level)
    )
    if done:
        pending = False
        if reported == PlacementState.READY:
            placement.ready_at = timezone.now()
    unload_in_flight = current == PlacementState.UNLOADING and not done
    if not unload_in_flight and transitions.allowed(current, Event.REPORTED, reported):
        transitions.move(placement, Event.REPORTED, reported, new=new)
    if status.cache_level in CacheLevel.values:
        placement.cache_level = status.cache_level
    if not pending:
        placement.inference_endpoint_url = status.inference_endpoint_url
    placement.bytes_done, placement.bytes_total = status.bytes_done, status.bytes_total
    placement.phase = status.phase
    placement.kv_cache_hit_rate, placement.kv_cache_usage = (
        status.kv_cache_hit_rate,
        status.kv_cache_usage,
    )
    placement.requests_in_flight = status.requests_in_flight
    placement.requests_waiting = status.requests_waiting
    if status.last_used_at is not None:
        placement.last_used_at = status.last_used_at
    if not pending:
        placement.error = status.error[:4000]
    # What its engine holds is the agent's to say (an engine that restarted lost its
    # adapters), except while a load is pending: a poll from before its answer says nothing of
    # the engine that load started (finish_load writes its LoRA limits).
    if not pending:
        placement.max_loras, placement.max_lora_rank = status.max_loras, status.max_lora_rank
        placement.max_num_seqs = status.max_num_seqs
        placement.adapters = adapter_facts(status.adapters)
    placement.updated_at = timezone.now()


def _orphan(status: ModelStatus) -> bool:
    """A model the agent holds that the catalog no longer has (deleted while the agent was
    away, or while its load ran): it is to be unloaded, unless that is under way or a load
    still runs (the agent refuses to unload then; the next heartbeat asks again)."""
    state, level = PlacementState(status.cache_state), CacheLevel(status.cache_level)
    if state == PlacementState.UNLOADING or state in transitions.LOADING:
        return False
    return level != CacheLevel.NONE or state != PlacementState.UNLOADED


def adapter_facts(adapters: Sequence[AdapterStatus]) -> dict[str, dict[str, float | int | None]]:
    """An engine's adapters as Placement.adapters keeps them (timestamps as epoch seconds)."""
    return {
        adapter.adapter_id: {
            "requests_total": adapter.requests_total,
            "requests_in_flight": adapter.requests_in_flight,
            "loaded_at": adapter.loaded_at.timestamp() if adapter.loaded_at else None,
            "last_used_at": adapter.last_used_at.timestamp() if adapter.last_used_at else None,
        }
        for adapter in adapters
    }


# A load queued this recently may not have reached its agent yet: its absence from a
# heartbeat says nothing.
_LOAD_GRACE = timedelta(seconds=30)


def _lost(placement: Placement, now: datetime) -> bool:
    """A placement the agent no longer reports: marked gone (unless its load is just queued)."""
    if placement.state in steps.LOADING_STATES and now - placement.updated_at < _LOAD_GRACE:
        return False
    if placement.state == PlacementState.UNLOADED and placement.cache_level == CacheLevel.NONE:
        return False
    transitions.move(placement, Event.AGENT_LOST)
    placement.cache_level, placement.adapters = CacheLevel.NONE, {}
    placement.inference_endpoint_url, placement.updated_at = "", now
    return True
