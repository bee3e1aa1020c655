"""The ASGI handler for `/v1`: Django's own, without the middleware stack.

Under daphne each Django middleware built on MiddlewareMixin runs its hooks in a
worker thread (sync_to_async), so the nine in settings.MIDDLEWARE cost a request
nine thread hops before the view starts (profiled in bench/README.md). The OpenAI
API needs none of them: it authenticates by API key (no sessions, users or CSRF),
sends no HTML (no clickjacking or messages), counts itself in Prometheus
(controlplane.metrics) and routes on exact paths (no APPEND_SLASH). Everything
else (the admin, the fleet API, the dashboard, /metrics) keeps the full stack.
"""

from __future__ import annotations

from typing import Any

from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response


class ApiHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        # What BaseHandler.load_middleware sets up, for an empty MIDDLEWARE.
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        handler = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        self._middleware_chain = convert_exception_to_response(handler)
