"""The ASGI application that daphne serves: HTTP, and the dashboard's WebSocket."""

from __future__ import annotations

import os
from typing import Any

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")
# Django must be set up before anything imports models (consumers, routing).
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402
from django.urls import path  # noqa: E402

from agents.consumers import FleetConsumer  # noqa: E402
from controlplane.gateway.handler import ApiHandler  # noqa: E402

site_app = ASGIStaticFilesHandler(django_asgi_app) if settings.SERVE_STATIC else django_asgi_app
api_app = ApiHandler()


async def http_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/v1 (the OpenAI API) through the lean handler; the rest with every middleware."""
    app = api_app if scope["path"].startswith("/v1/") else site_app
    await app(scope, receive, send)


# The session cookie authenticates the socket (the consumer checks is_staff in connect);
# the Origin check keeps other sites' pages from opening it with that cookie.
websocket_app = AllowedHostsOriginValidator(
    AuthMiddlewareStack(URLRouter([path("ws/fleet/", FleetConsumer.as_asgi())]))
)

application = ProtocolTypeRouter({"http": http_app, "websocket": websocket_app})
