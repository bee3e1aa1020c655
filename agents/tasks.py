"""Celery tasks: thin. Each takes ids, calls the agent through agent_client, and hands the
answer to an action. Queued by actions with transaction.on_commit, or by beat."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable

from celery import shared_task
from django.conf import settings
from django.db import OperationalError, close_old_connections

from agents import actions, agent_client
from agents.choices import LoadTrigger
from agents.models import Agent, Model

log = logging.getLogger(__name__)

_WRITE_ATTEMPTS = 3


@shared_task(name="agents.tasks.load")
def load(event_id: int, victim_event_ids: list[int] | None = None) -> None:
    """Step the victims down (making room), then have the agent load the model."""
    # Claimed first: a load under way is never sent again (settle_orphaned_steps), even while
    # its victims step down.
    job = actions.begin_load(event_id)
    if job is None:
        return
    for victim in victim_event_ids or []:
        unload(victim)
    try:
        response = asyncio.run(
            agent_client.load_model(
                job.agent_url,
                job.credential,
                job.request,
                seconds=settings.COLD_START_TIMEOUT_SECONDS,
            )
        )
    except agent_client.AgentCallFailed as exc:
        actions.fail_load(event_id, f"{exc.code}: {exc}")
        return
    except Exception as exc:
        # Whatever it was, the requests waiting on this load must hear now, not when the
        # sweep expires it (COLD_START_TIMEOUT_SECONDS later): fail it, so they move on.
        log.exception("load %s broke", event_id)
        actions.fail_load(event_id, f"load task failed: {exc}")
        return
    _record(actions.finish_load, event_id, response)


def _record(write: Callable[..., object], event_id: int, *args: object) -> None:
    """Write what the agent answered. A transaction that loses to a deadlock or a database
    blink is safe to run again (it reads the rows afresh); after the last try the error
    propagates, and the sweep ends the step from what the agent's heartbeat reports
    (actions.settle_orphaned_steps)."""
    for attempt in range(1, _WRITE_ATTEMPTS + 1):
        try:
            write(event_id, *args)
            return
        except OperationalError as exc:
            log.warning("recording step %s failed (try %d): %s", event_id, attempt, exc)
            close_old_connections()
            if attempt == _WRITE_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)


@shared_task(name="agents.tasks.unload")
def unload(event_id: int) -> None:
    job = actions.begin_unload(event_id)
    if job is None:
        return
    try:
        response = asyncio.run(
            agent_client.unload_model(
                job.agent_url, job.credential, job.model_id, job.to_level,
                seconds=actions.UNLOAD_TIMEOUT_SECONDS, drain_seconds=job.drain_seconds,
            )
        )  # fmt: skip
    except agent_client.AgentCallFailed as exc:
        actions.fail_unload(event_id, f"{exc.code}: {exc}")
        return
    _record(actions.finish_unload, event_id, response)


# One poll at a time per worker process: beat's `expires` drops a run that waited too long,
# and this drops one that would overlap a slow predecessor.
_polling = threading.Lock()


@shared_task(name="agents.tasks.poll_heartbeats")
def poll_heartbeats() -> None:
    """Poll every agent's heartbeat at once and write what they said (or that they did not)."""
    if not _polling.acquire(blocking=False):
        log.warning("the previous heartbeat poll is still running; skipping this one")
        return
    try:
        started = time.monotonic()
        targets = [
            agent_client.HeartbeatTarget(agent.pk, agent.base_url, agent.credential)
            for agent in Agent.objects.only("pk", "agent_id", "base_url", "credential_nonce")
        ]
        results = asyncio.run(
            agent_client.poll_heartbeats(targets, seconds=settings.HEARTBEAT_TIMEOUT_SECONDS)
        )
        actions.apply_heartbeats(results)
        # What a round brings back (an agent back from a partition) must not outnumber
        # max_replicas until the next sweep.
        actions.step_down_excess()
        log.info(
            "polled %d agent(s) in %.2f s (%d missed)",
            len(targets),
            time.monotonic() - started,
            sum(result.response is None for result in results),
        )
    finally:
        _polling.release()


_sweeping = threading.Lock()


@shared_task(name="agents.tasks.sweep")
def sweep() -> None:
    """The eviction ladder's sweep (actions.sweep), one at a time per worker process."""
    if not _sweeping.acquire(blocking=False):
        return
    try:
        steps = actions.sweep()
    finally:
        _sweeping.release()
    if steps:
        log.info("sweep stepped %d placement(s) down", len(steps))


@shared_task(name="agents.tasks.scale_out")
def scale_out(model_pk: int) -> None:
    model = Model.objects.filter(pk=model_pk).first()
    if model is not None:
        actions.scale_out(model, LoadTrigger.SCALE_OUT)


@shared_task(name="agents.tasks.unload_adapter")
def unload_adapter(placement_pk: int, adapter_id: str) -> None:
    """One idle LoRA adapter out of its engine (the sweep's keep-alive), then out of the row."""
    job = actions.adapter_unload_job(placement_pk, adapter_id)
    if job is None:
        return
    try:
        asyncio.run(
            agent_client.unload_adapter(
                job.agent_url, job.credential, job.model_id, adapter_id, seconds=30
            )
        )
    except agent_client.AgentCallFailed as exc:
        if exc.code != "adapter_not_found":  # gone already: the row follows below
            log.warning("could not unload adapter %s: %s: %s", adapter_id, exc.code, exc)
            return
    actions.forget_adapter(placement_pk, adapter_id)
    log.info("adapter %s unloaded from %s on %s (idle)", adapter_id, job.model_id, job.agent_id)


@shared_task(name="agents.tasks.unload_orphan")
def unload_orphan(agent_pk: int, model_id: str) -> None:
    """A model that is no longer in the catalog off an agent: engine stopped, files deleted
    (queued when a model is deleted, and by heartbeats that still report one)."""
    target = actions.orphan_unload_target(agent_pk, model_id)
    if target is None:
        return
    base_url, credential = target
    try:
        asyncio.run(
            agent_client.unload_model(
                base_url, credential, model_id, "NONE", seconds=actions.UNLOAD_TIMEOUT_SECONDS,
                force=True,
            )
        )  # fmt: skip
    except agent_client.AgentCallFailed as exc:
        if exc.code != "model_not_found":  # else gone already
            log.warning("could not unload %s (not in the catalog) from %s: %s: %s",
                        model_id, base_url, exc.code, exc)  # fmt: skip
        return
    log.info("%s (not in the catalog) unloaded from %s", model_id, base_url)


@shared_task(name="agents.tasks.tell_revoked_agents")
def tell_revoked_agents() -> None:
    """Beat's retry of revocations an agent has not heard of yet (it was unreachable)."""
    actions.tell_revoked_agents()


@shared_task(name="agents.tasks.prune_history")
def prune_history() -> None:
    """Beat's hourly pruning of load events past their retention (docs: Bounded history); the
    gateway prunes its own figures (gateway.tasks.prune_history)."""
    if pruned := actions.prune_load_events():
        log.info("pruned %s load_events", pruned)
