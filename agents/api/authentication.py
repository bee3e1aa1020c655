"""How node agents authenticate to the control plane: the shared agent token."""

from __future__ import annotations

import hmac

from django.conf import settings
from rest_framework import authentication, exceptions, permissions
from rest_framework.request import Request
from rest_framework.views import APIView


class AgentPrincipal:
    """Who a request authenticated by the agent token is: some node agent of this fleet."""

    is_authenticated = True
    is_staff = False

    def __str__(self) -> str:
        return "node agent"


def bearer_token(header: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None if it is not one."""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class AgentTokenAuthentication(authentication.BaseAuthentication):
    """`Authorization: Bearer <AGENT_TOKEN>`, compared in constant time."""

    def authenticate(self, request: Request) -> tuple[AgentPrincipal, str] | None:
        header = request.headers.get("Authorization", "")
        if not header:
            return None
        token = bearer_token(header)
        if token is None:
            raise exceptions.AuthenticationFailed("Expected 'Authorization: Bearer <agent token>'.")
        if not hmac.compare_digest(token.encode(), settings.AGENT_TOKEN.encode()):
            raise exceptions.AuthenticationFailed("Invalid agent token.")
        return AgentPrincipal(), token

    def authenticate_header(self, request: Request) -> str:
        # Its presence turns DRF's "not authenticated" into 401 instead of 403.
        return 'Bearer realm="llmfleet-agents"'


class IsAgent(permissions.BasePermission):
    message = "This endpoint is for node agents (the agent token)."

    def has_permission(self, request: Request, view: APIView) -> bool:
        return isinstance(request.user, AgentPrincipal)
