from __future__ import annotations

import pytest

from agents import actions
from agents.choices import AgentState
from nodeagent.protocol import RegisterRequest
from tests.factories import AgentFactory

pytestmark = pytest.mark.django_db


def test_drain_stops_new_work_and_undrain_restores_the_reported_state():
    agent = AgentFactory(state=AgentState.INFERRING, reported_state=AgentState.INFERRING)

    drained = actions.drain_agent(agent.agent_id)
    assert drained.state == AgentState.DRAINING
    assert drained.drained_at is not None
    assert not drained.is_routable

    undrained = actions.undrain_agent(agent.agent_id)
    assert undrained.state == AgentState.INFERRING
    assert undrained.drained_at is None
    assert undrained.is_routable


def test_draining_twice_keeps_the_first_drain_time():
    agent = AgentFactory()
    first = actions.drain_agent(agent.agent_id).drained_at
    assert actions.drain_agent(agent.agent_id).drained_at == first


def test_drain_keeps_an_offline_agent_offline_and_remembers_the_order():
    agent = AgentFactory(state=AgentState.OFFLINE)
    assert actions.drain_agent(agent.agent_id).state == AgentState.OFFLINE

    # When it comes back, the drain order still holds.
    back = RegisterRequest(agent_id=agent.agent_id, base_url=agent.base_url)
    registration = actions.register_agent(back, speaking_as=agent.agent_id)
    registered, created = registration.agent, registration.created
    assert not created
    assert registered.state == AgentState.DRAINING


def test_undrain_of_a_degraded_agent_leaves_it_degraded():
    agent = AgentFactory(state=AgentState.DEGRADED, drained_at="2026-01-01T00:00Z")
    assert actions.undrain_agent(agent.agent_id).state == AgentState.DEGRADED
