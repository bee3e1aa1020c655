"""How node agents authenticate to the control plane: each with its own credential, or the
fleet's enrolment token to enrol an agent_id nobody holds (docs/agents.md: Agent enrolment)."""

from __future__ import annotations

import hmac
from typing import Any

from django.conf import settings
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request
from rest_framework.views import APIView

from agents import credentials
from agents.models import Agent


class AgentPrincipal:
    """Who a request authenticated as a node agent is: the agent a credential belongs to, or,
    with the enrolment token, an agent not enrolled yet (`agent_id` None)."""

    is_authenticated = True
    is_staff = False

    def __init__(self, agent_id: str | None) -> None:
        self.agent_id = agent_id

    def __str__(self) -> str:
        return f"node agent {self.agent_id}" if self.agent_id else "an enrolling node agent"


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None if it is not one."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class AgentTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <agent credential>` or `<enrolment token>`, compared in
    constant time."""

    def authenticate(self, request: Request) -> tuple[AgentPrincipal, str] | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return None
        token = bearer_token(header)
        if token is None:
            raise exceptions.AuthenticationFailed("Expected 'Authorization: Bearer <credential>'.")
        if credentials.looks_like_credential(token):
            return AgentPrincipal(_owner(token)), token
        if hmac.compare_digest(token.encode(), settings.AGENT_TOKEN.encode()):
            return AgentPrincipal(None), token
        raise exceptions.AuthenticationFailed("Invalid agent credential or enrolment token.")

    def authenticate_header(self, request: Request) -> str:
        # Its presence turns DRF's "not authenticated" into 401 instead of 403.
        return 'Bearer realm="llmfleet-agents"'


def _owner(token: str) -> str:
    agent = (
        Agent.objects.filter(credential_fingerprint=credentials.fingerprint(token))
        .only("agent_id", "credential_nonce")
        .first()
    )
    if agent is None or not hmac.compare_digest(agent.credential.encode(), token.encode()):
        raise exceptions.AuthenticationFailed(
            "Unknown or revoked agent credential: enrol again with the enrolment token."
        )
    return agent.agent_id


class IsAgent(permissions.BasePermission):
    message = "This endpoint is for node agents (their credential, or the enrolment token)."

    def has_permission(self, request: Request, view: APIView) -> bool:
        return isinstance(request.user, AgentPrincipal)


class AgentTokenScheme(OpenApiAuthenticationExtension):  # type: ignore[no-untyped-call]
    """How the OpenAPI schema describes the agents' authentication: a bearer token."""

    target_class = AgentTokenAuthentication
    name = "agentCredential"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "An agent's own credential, or the enrolment token to enrol one.",
        }
