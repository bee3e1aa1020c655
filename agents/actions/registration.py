"""Agents joining and leaving: registration, drain orders and what the gateway saw of a
replica (`replica_failed`)."""

from __future__ import annotations

import asyncio
import hmac
import logging
from dataclasses import asdict, dataclass
from datetime import datetime

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from agents import agent_client, credentials, events, transitions
from agents.choices import (
    AgentState,
    PlacementState,
)
from agents.faults import Fault
from agents.models import Agent, Placement
from agents.scheduling import effective_agent_state, health_verdict, summarize_gpus
from agents.transitions import Event
from nodeagent.protocol import (
    RegisterRequest,
)

log = logging.getLogger(__name__)


class RegistrationRefused(Exception):
    """The registration is not this caller's to make; `status` is the HTTP answer (403)."""

    def __init__(self, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Registration:
    agent: Agent
    created: bool
    # Issued by this registration (an enrolment): the agent's to keep, never shown again.
    credential: str = ""


def register_agent(request: RegisterRequest, *, speaking_as: str | None) -> Registration:
    """Create or refresh the agent named by `request.agent_id`.

    `speaking_as` is the agent whose credential authenticated the call, or None for the
    fleet's enrolment token. An agent speaks only for itself; the enrolment token enrols
    an agent_id nobody holds (new, or enrolled before credentials existed) and gets its
    credential back, once. Anything else raises RegistrationRefused, writing nothing.
    Idempotent for an enrolled agent: a restarted agent registers again and updates its
    row. Takes a row lock on the agent.
    """
    if speaking_as is not None and speaking_as != request.agent_id:
        raise RegistrationRefused(
            f"this credential is agent {speaking_as!r}'s; it cannot register {request.agent_id!r}"
        )
    gpus = summarize_gpus(request.gpus)
    now = timezone.now()
    with transaction.atomic():
        # The lock orders a registration against a concurrent drain or heartbeat of the
        # same agent, so neither overwrites the other's half of the row.
        agent, created = Agent.objects.select_for_update(no_key=True, of=("self",)).get_or_create(
            agent_id=request.agent_id, defaults={"base_url": request.base_url}
        )
        if speaking_as is None:
            issued = _enrol(agent)
        elif not agent.credential_nonce:  # revoked since the credential was checked
            raise RegistrationRefused(f"agent {agent.agent_id!r} is revoked", status=401)
        else:
            issued = ""
            agent.credential_confirmed_at = agent.credential_confirmed_at or now
        reported = AgentState(request.state)
        agent.base_url = request.base_url
        agent.version = request.version
        agent.contract_version = request.contract
        agent.labels = dict(request.labels)
        agent.gpus = [asdict(gpu) for gpu in request.gpus]
        agent.gpu_name = gpus.name
        agent.gpu_count = gpus.count
        agent.gpu_memory_total = gpus.memory_total
        agent.gpu_memory_free = gpus.memory_free
        agent.gpu_utilization = gpus.utilization
        agent.reported_state = reported
        # It just spoke to us, so any earlier verdict of DEGRADED or OFFLINE is over.
        agent.state = effective_agent_state(reported, draining=agent.drained_at is not None)
        agent.last_heartbeat_at = now
        agent.heartbeat_failures = 0
        agent.save()
        events.announce(agents=[agent.pk])
    if issued:
        log.info("agent %s enrolled (credential %s...)", agent.agent_id, _short(agent))
    return Registration(agent, created, issued)


def _enrol(agent: Agent) -> str:
    """Issue the credential of an agent enrolling with the enrolment token."""
    if agent.credential_revoked_at is not None:
        raise RegistrationRefused(
            f"agent {agent.agent_id!r} is revoked; an operator must allow it to enrol again"
            f" (manage.py agent_credential allow-enrolment {agent.agent_id})"
        )
    if agent.credential_nonce and agent.credential_confirmed_at is not None:
        raise RegistrationRefused(
            f"agent {agent.agent_id!r} is enrolled: it registers with its own credential. An "
            "agent that lost it needs an operator to revoke it and allow it to enrol again."
        )
    _issue(agent)
    return agent.credential


def _issue(agent: Agent) -> None:
    # A new enrolment supersedes a revoked credential's notice: the agent replaces it now.
    agent.credential_revoked_nonce = agent.credential_pending_nonce = ""
    agent.credential_nonce = credentials.new_nonce()
    agent.credential_fingerprint = credentials.fingerprint(agent.credential)
    agent.credential_issued_at = timezone.now()
    agent.credential_confirmed_at = None


def _short(agent: Agent) -> str:
    return agent.credential_fingerprint[:12]


class CredentialError(Exception):
    """A credential operation that could not be carried out; the message says why."""


def rotate_agent_credential(agent_id: str) -> Agent:
    """Hand the agent a new credential and forget the old one. The new one is pending here
    first: the agent, told with its current credential, keeps it only once this control plane
    confirms it (`confirm_pending_credential`), so whoever else holds the current one cannot
    rotate the agent to a credential of their own and lock the control plane out. Only once the
    agent has kept it does the control plane switch, so the two never disagree. Raises
    CredentialError when the agent is not enrolled or did not take it. Holds no lock across
    the call: one row update, compared with the nonces it read."""
    agent = Agent.objects.get(agent_id=agent_id)
    if not agent.credential_nonce:
        raise CredentialError(f"agent {agent_id} is not enrolled: nothing to rotate")
    old_nonce, current = agent.credential_nonce, agent.credential
    pending = credentials.new_nonce()
    if not Agent.objects.filter(pk=agent.pk, credential_nonce=old_nonce).update(
        credential_pending_nonce=pending
    ):
        raise CredentialError(f"agent {agent_id}'s credential changed meanwhile; rotate again")
    new = credentials.derive(agent_id, pending)
    try:
        asyncio.run(agent_client.set_credential(agent.base_url, current, new, 10.0))
    except agent_client.AgentCallFailed as exc:
        Agent.objects.filter(pk=agent.pk, credential_pending_nonce=pending).update(
            credential_pending_nonce=""
        )
        raise CredentialError(f"agent {agent_id} did not take its new credential: {exc}") from None
    # The agent takes the old one until a call with the new one arrives (so a lost answer
    # above leaves the two in agreement): make that call now.
    target = agent_client.HeartbeatTarget(agent.pk, agent.base_url, new)
    asyncio.run(agent_client.poll_heartbeats([target], seconds=10.0))
    with transaction.atomic():
        switched = Agent.objects.filter(
            pk=agent.pk, credential_nonce=old_nonce, credential_pending_nonce=pending
        ).update(
            credential_nonce=pending,
            credential_pending_nonce="",
            credential_fingerprint=credentials.fingerprint(new),
            credential_issued_at=timezone.now(),
            updated_at=timezone.now(),
        )
        if not switched:
            Agent.objects.filter(pk=agent.pk, credential_pending_nonce=pending).update(
                credential_pending_nonce=""
            )
            raise CredentialError(f"agent {agent_id}'s credential changed meanwhile; rotate again")
        events.announce(agents=[agent.pk])
    agent.refresh_from_db()
    log.info("agent %s: credential rotated (now %s...)", agent_id, _short(agent))
    return agent


def confirm_credential(agent_id: str, presented: str, *, revocation: bool = False) -> bool:
    """Whether `presented` is the credential a rotation of `agent_id` under way is handing it
    (or, with `revocation`, the one a revocation took from it): what the agent asks before it
    keeps a new credential or forgets its own, so that nobody but this control plane, whoever
    holds the current credential, can rotate it to one of theirs or lock it out. Constant
    time."""
    agent = (
        Agent.objects.filter(agent_id=agent_id)
        .only("credential_pending_nonce", "credential_revoked_nonce")
        .first()
    )
    nonce = "" if agent is None else (
        agent.credential_revoked_nonce if revocation else agent.credential_pending_nonce
    )  # fmt: skip
    if not nonce:
        return False
    return hmac.compare_digest(credentials.derive(agent_id, nonce).encode(), presented.encode())


def revoke_agent_credential(agent_id: str) -> Agent:
    """Revoke the agent's credential: it can no longer register or be called, it is OFFLINE at
    once (no new work), and its agent_id cannot enrol again until `allow_enrolment`. The agent
    is told to forget it too, so one that leaked reaches nothing there either: now if it
    answers, else by `tell_revoked_agents` until it does. Takes a row lock on the agent."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update(no_key=True, of=("self",)).get(agent_id=agent_id)
        if agent.credential_nonce:
            agent.credential_revoked_nonce = agent.credential_nonce
        agent.credential_nonce = agent.credential_fingerprint = ""
        agent.credential_pending_nonce = ""
        agent.credential_revoked_at = timezone.now()
        agent.state = AgentState.OFFLINE
        agent.heartbeat_failures = max(agent.heartbeat_failures, settings.HEARTBEAT_OFFLINE_AFTER)
        agent.save()
        events.announce(agents=[agent.pk])
    log.warning("agent %s: credential revoked", agent_id)
    tell_revoked_agents([agent.pk])
    return agent


@dataclass(frozen=True)
class RevocationNotice:
    agent_pk: int
    agent_id: str
    base_url: str
    revoked: str  # the revoked credential: what the agent still takes until it is told
    nonce: str


def tell_revoked_agents(agent_pks: list[int] | None = None) -> int:
    """Tell agents whose credential was revoked (and who have not heard yet) to forget it;
    `None`: every such agent (beat's retry). Returns how many were told."""
    rows = Agent.objects.exclude(credential_revoked_nonce="")
    if agent_pks is not None:
        rows = rows.filter(pk__in=agent_pks)
    notices = [
        RevocationNotice(
            agent.pk, agent.agent_id, agent.base_url,
            credentials.derive(agent.agent_id, agent.credential_revoked_nonce),
            agent.credential_revoked_nonce,
        )
        for agent in rows.only("agent_id", "base_url", "credential_revoked_nonce")
    ]  # fmt: skip
    if not notices:
        return 0
    told = asyncio.run(_tell(notices))
    for notice in told:
        Agent.objects.filter(pk=notice.agent_pk, credential_revoked_nonce=notice.nonce).update(
            credential_revoked_nonce=""
        )
    return len(told)


async def _tell(notices: list[RevocationNotice]) -> list[RevocationNotice]:
    async def one(notice: RevocationNotice) -> RevocationNotice | None:
        try:
            await agent_client.forget_credential(notice.base_url, notice.revoked, 5.0)
        except agent_client.AgentCallFailed as exc:
            # It takes that credential no more (told before, or enrolled anew): told already.
            if exc.code not in ("unauthorized", "not_enrolled"):
                log.warning("agent %s was not told of its revocation yet: %s", notice.agent_id,
                            exc)  # fmt: skip
                return None
        log.info("agent %s was told of its revocation", notice.agent_id)
        return notice

    return [told for told in await asyncio.gather(*map(one, notices)) if told is not None]


def allow_enrolment(agent_id: str) -> Agent:
    """Let a revoked agent_id enrol again with the enrolment token. Takes a row lock."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update(no_key=True, of=("self",)).get(agent_id=agent_id)
        agent.credential_revoked_at = None
        agent.save(update_fields=["credential_revoked_at", "updated_at"])
        events.announce(agents=[agent.pk])
    return agent


def drain_agent(agent_id: str) -> Agent:
    """Stop sending new work to the agent; what it serves now finishes. Takes a row lock."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update(no_key=True, of=("self",)).get(agent_id=agent_id)
        if agent.drained_at is None:
            agent.drained_at = timezone.now()
        agent.state = effective_agent_state(
            AgentState(agent.reported_state),
            draining=True,
            health=health_verdict(AgentState(agent.state)),
        )
        agent.save(update_fields=["drained_at", "state", "updated_at"])
        events.announce(agents=[agent.pk])
    return agent


def undrain_agent(agent_id: str) -> Agent:
    """Let the agent take new work again. Takes a row lock."""
    with transaction.atomic():
        agent = Agent.objects.select_for_update(no_key=True, of=("self",)).get(agent_id=agent_id)
        agent.drained_at = None
        agent.state = effective_agent_state(
            AgentState(agent.reported_state),
            draining=False,
            health=health_verdict(AgentState(agent.state)),
        )
        agent.save(update_fields=["drained_at", "state", "updated_at"])
        events.announce(agents=[agent.pk])
    return agent


def replica_failed(placement_pk: int, ready_at: datetime | None, fault: str, message: str) -> None:
    """What the gateway saw of a READY replica before the first byte, written at once, so no
    web process routes to it until a heartbeat says otherwise: an agent that did not answer
    is DEGRADED (one more missed heartbeat than that makes it OFFLINE), one that is stopping
    is DRAINING, and a model the agent no longer serves is FAILED there.

    Locks one row: the agent, or the placement (never both, so no lock order to keep).
    """
    with transaction.atomic():
        if fault == Fault.NOT_SERVING:
            # Only the READY row the gateway tried: a load that finished since (a new ready_at)
            # is another replica, not this failure's.
            failed = Placement.objects.filter(
                pk=placement_pk, state=PlacementState.READY, ready_at=ready_at
            ).update(
                state=transitions.target(Event.FAILED), inference_endpoint_url="",
                error=f"gateway: {message}"[:4000], updated_at=timezone.now(),
            )  # fmt: skip
            if failed:
                events.announce(placements=[placement_pk])
            return
        agent = (
            Agent.objects.select_for_update(no_key=True, of=("self",))
            .filter(placements__pk=placement_pk)
            .first()
        )
        if agent is None:  # the placement was deleted meanwhile
            return
        health = health_verdict(AgentState(agent.state))
        if fault == Fault.DRAINING:
            agent.reported_state = AgentState.DRAINING
        else:
            agent.heartbeat_failures = max(
                agent.heartbeat_failures, settings.HEARTBEAT_DEGRADED_AFTER
            )
            if health != AgentState.OFFLINE:
                health = AgentState.DEGRADED
        state = effective_agent_state(
            AgentState(agent.reported_state), draining=agent.drained_at is not None, health=health
        )
        if state != agent.state:
            log.warning("agent %s is %s: %s", agent.agent_id, state, message)
        agent.state = state
        agent.save(update_fields=["state", "reported_state", "heartbeat_failures", "updated_at"])
        events.announce(agents=[agent.pk])
