"""Credential rotation and revocation on the control plane's side: an agent keeps a new
credential only once the control plane confirms it is the one it issues, and a revocation an
agent could not hear is told again until it does."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from django.test import Client

from agents import actions, credentials
from agents.models import Agent
from tests.factories import AgentFactory
from tests.support import free_port

pytestmark = pytest.mark.django_db

CONFIRM = "/api/agents/gpu-1/credential/confirm"


def confirm(client: Client, token: str) -> int:
    return client.post(CONFIRM, HTTP_AUTHORIZATION=f"Bearer {token}").status_code


@pytest.mark.django_db(transaction=True)  # the view reads in a thread of its own
def test_only_the_credential_a_rotation_is_issuing_is_confirmed(client):
    agent = AgentFactory(agent_id="gpu-1", credential_nonce="a" * 64)
    current = agent.credential
    assert confirm(client, current) == 403  # no rotation under way: nothing to confirm
    Agent.objects.filter(pk=agent.pk).update(credential_pending_nonce="b" * 64)
    issued = credentials.derive("gpu-1", "b" * 64)
    assert confirm(client, issued) == 204
    assert confirm(client, current) == 403  # the current one is not the new one
    assert confirm(client, "lfa_" + "e" * 64) == 403  # one of a caller's own making
    assert client.post("/api/agents/nobody/credential/confirm").status_code == 403
    assert client.get(CONFIRM).status_code == 405


@pytest.mark.django_db(transaction=True)
def test_only_a_revocation_of_this_control_plane_is_confirmed(client):
    agent = AgentFactory(agent_id="gpu-1", credential_nonce="a" * 64)
    current = agent.credential

    def revocation(token: str, body: str = '{"revocation": true}') -> int:
        return client.post(
            CONFIRM, data=body, content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        ).status_code  # fmt: skip

    assert revocation(current) == 403  # not revoked: whoever holds it cannot lock it out
    Agent.objects.filter(pk=agent.pk).update(credential_revoked_nonce="a" * 64)
    assert revocation(current) == 204
    assert revocation("lfa_" + "e" * 64) == 403
    assert revocation(current, '{"revocation": "yes"}') == 400
    assert revocation(current, "{not json") == 400


class FakeAgent:
    """An agent's DELETE /credential, answering as the real one would, recording callers."""

    def __init__(self) -> None:
        self.port = free_port()
        self.calls: list[str] = []
        self.up = True
        calls = self.calls

        class Handler(BaseHTTPRequestHandler):
            def do_DELETE(self) -> None:
                calls.append(self.headers.get("Authorization", ""))
                body = json.dumps({"status": "success"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.handler = Handler
        self.server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()


@pytest.fixture
def fake_agent() -> Iterator[FakeAgent]:
    agent = FakeAgent()
    yield agent
    agent.stop()


def test_a_revocation_the_agent_could_not_hear_is_told_again_until_it_does(fake_agent):
    agent = AgentFactory(agent_id="gpu-1", base_url=fake_agent.url, credential_nonce="a" * 64)
    revoked = agent.credential
    actions.revoke_agent_credential("gpu-1")  # the agent is down: nobody answers
    row = Agent.objects.get()
    assert (row.credential, row.credential_fingerprint) == ("", "")  # refused here at once
    assert row.credential_revoked_nonce == "a" * 64  # ... and still to be told there
    assert actions.tell_revoked_agents() == 0  # still down

    fake_agent.start()
    assert actions.tell_revoked_agents() == 1
    assert fake_agent.calls == [f"Bearer {revoked}"]
    assert Agent.objects.get().credential_revoked_nonce == ""
    assert actions.tell_revoked_agents() == 0  # told once is enough


def test_enrolling_again_ends_the_notice_of_a_revoked_credential():
    agent = AgentFactory(agent_id="gpu-1", credential_nonce="a" * 64)
    actions.revoke_agent_credential("gpu-1")
    actions.allow_enrolment("gpu-1")
    from agents.actions.registration import _enrol

    row = Agent.objects.get(pk=agent.pk)
    _enrol(row)
    assert row.credential_revoked_nonce == ""
