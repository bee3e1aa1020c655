"""The ASGI application the web process serves (uvicorn, `controlplane.web`; or daphne): HTTP,
the dashboard's WebSocket, and the lifespan whose shutdown writes what the process still holds."""

from __future__ import annotations

import asyncio
import os
import sys
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

from controlplane import bodylimit  # noqa: E402
from controlplane.dashboard import FleetConsumer  # noqa: E402
from controlplane.gateway.handler import ApiHandler  # noqa: E402

site_app = ASGIStaticFilesHandler(django_asgi_app) if settings.SERVE_STATIC else django_asgi_app
api_app = ApiHandler()


# The HTTP requests being answered, which a stopping web process lets end before its last
# writes.
_answering: set[asyncio.Task[Any]] = set()


async def http_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """/v1 (the OpenAI API) through the lean handler; the rest with every middleware."""
    body = await bodylimit.guard(scope, receive, send, bodylimit.limit_for(scope["path"]))
    if body is None:
        return
    app = api_app if scope["path"].startswith("/v1/") else site_app
    task = asyncio.current_task()
    if task is not None:
        _answering.add(task)
    try:
        await app(scope, body, send)
    finally:
        _answering.discard(task)


# The session cookie authenticates the socket (the consumer checks is_staff in connect);
# the Origin check keeps other sites' pages from opening it with that cookie.
websocket_app = AllowedHostsOriginValidator(
    AuthMiddlewareStack(URLRouter([path("ws/fleet/", FleetConsumer.as_asgi())]))
)


async def lifespan_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """uvicorn's lifespan: its shutdown comes once the requests still open have ended (or were
    cancelled past WEB_DRAIN_SECONDS), and makes the last writes. daphne sends none."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await _last_writes()
            await send({"type": "lifespan.shutdown.complete"})
            return


application = ProtocolTypeRouter(
    {"http": http_app, "websocket": websocket_app, "lifespan": lifespan_app}
)


async def _last_writes() -> None:
    """Once the requests the server cancels as it stops have ended (their usage settled), the
    gateway's buffered usage and request figures are written and its connections closed."""
    from controlplane.gateway.state import close_current

    await asyncio.sleep(0)  # daphne's own shutdown trigger, called next, cancels them
    if _answering:
        await asyncio.wait(set(_answering), timeout=10)
    await close_current()


def _at_daphne_shutdown() -> None:
    """Under daphne, `_last_writes` before its reactor stops: a stopped web process loses no
    usage, and logs no ERROR for a client session left open. Only Deferreds of the "before"
    phase are waited for. Another server (tests' live server) never loads daphne."""
    if "daphne.server" not in sys.modules:
        return
    from twisted.internet import defer, reactor

    def stop() -> defer.Deferred[None]:
        return defer.Deferred.fromFuture(asyncio.ensure_future(_last_writes()))

    # (Twisted declares the interface method without self: mypy counts its arguments off by one)
    reactor.addSystemEventTrigger("before", "shutdown", stop)  # type: ignore[arg-type]


def _limit_bodies_under_daphne() -> None:
    """Under daphne, which buffers a whole body before the application sees it, bodies over
    GATEWAY_MAX_BODY_BYTES are refused as they arrive (controlplane.bodylimit)."""
    if "daphne.server" in sys.modules:
        bodylimit.install(settings.GATEWAY_MAX_BODY_BYTES)


_at_daphne_shutdown()
_limit_bodies_under_daphne()
