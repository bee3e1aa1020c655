"""The ASGI handler for `/v1`: Django's own, without what the OpenAI API does not use.

Under daphne, Django's handler costs each request several thread hops before and
after the view: one per MiddlewareMixin middleware (nine in settings.MIDDLEWARE),
one for `request_started`'s receivers, one for closing the response
(`request_finished`), and a fresh thread-sensitive context, so that any ORM call
of the request runs in a thread of its own (profiled in bench/README.md). The
OpenAI API needs none of that: it authenticates by API key (no sessions, users or
CSRF), sends no HTML (no clickjacking or messages), counts itself in Prometheus
(controlplane.metrics), routes on exact paths (no APPEND_SLASH), and reads the
database only when its short-lived caches miss (controlplane.gateway.cache).

The four POST endpoints (chat, completions, responses, embeddings: nearly every
request) go further: `serve_api` answers them from the ASGI scope and the body, with no
request object, URL resolving or view wrappers (`views.serve`, which the views call too).
For the rest of /v1, this handler keeps Django's request and response objects, URL
resolving, views and client-disconnect handling, and drops the rest: no middleware, no
`request_started`, and the response closed in the event loop (`request_finished`'s
receivers find no database connection there). Without a per-request context, the
views' ORM calls share asgiref's one thread for thread-sensitive code, and so one
persistent database connection; `drop_broken_connections` closes it after a
database error (the caches and the usage and stats flushers call it), which
`close_old_connections` would otherwise have done at the end of a request.
Everything else (the admin, the fleet API, the dashboard, /metrics) keeps
Django's full handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import connections
from django.http.response import HttpResponseBase
from django.urls import set_script_prefix

from controlplane.gateway.apis import API_BY_PATH, Api
from controlplane.gateway.errors import answered

log = logging.getLogger(__name__)

# Where the handler keeps the request's id in its scope: what the client sees (X-Request-Id)
# and the operators' log names a request's failure by.
REQUEST_ID = "llmfleet.request_id"


def new_request_id() -> str:
    return f"req_{secrets.token_hex(12)}"


def request_id_of(request: Any) -> str:
    """The id the /v1 handler gave the request (a new one where it gave none: Django's test
    client)."""
    found = getattr(request, "scope", {}).get(REQUEST_ID)
    return str(found) if found else new_request_id()


def header_reader(scope: dict[str, Any]) -> Callable[[str], str | None]:
    """A request header's value by name (any case), None if absent: from the ASGI scope,
    whose names are lower case."""

    def header(name: str) -> str | None:
        wanted = name.lower().encode("latin-1")
        for found, value in scope["headers"]:
            if found == wanted:
                return bytes(value).decode("latin-1")
        return None

    return header


class ApiHandler(ASGIHandler):
    def load_middleware(self, is_async: bool = False) -> None:
        # What BaseHandler.load_middleware sets up, for an empty MIDDLEWARE.
        self._view_middleware: list[Any] = []
        self._template_response_middleware: list[Any] = []
        self._exception_middleware: list[Any] = []
        handler = self._get_response_async if is_async else self._get_response  # type: ignore[attr-defined]
        self._middleware_chain = convert_exception_to_response(handler)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"the /v1 handler serves HTTP, not {scope['type']}")
        await self.handle(scope, receive, send)

    async def handle(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        # No key, or a body over the limit: answered before a byte of the body is read. (Local
        # imports: auth needs the cache, which imports this module.)
        from controlplane.gateway.auth import refuse_before_body
        from controlplane.gateway.state import current

        request_id = scope[REQUEST_ID] = new_request_id()
        refusal = await refuse_before_body(scope, current().cache)
        if refusal is not None:
            refusal["X-Request-Id"] = request_id
            await self.send_response(refusal, send)
            return
        api = API_BY_PATH.get(scope["path"]) if scope["method"] == "POST" else None
        if api is not None:
            await self.serve_api(scope, receive, send, api, request_id)
            return
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            assert error_response is not None
            body_file.close()
            await self.send_response(error_response, send)
            error_response.close()
            return

        try:
            await self.answer_unless_gone(self.run_get_response(request), receive, send, request_id)
        finally:
            body_file.close()

    async def serve_api(
        self, scope: dict[str, Any], receive: Any, send: Any, api: Api, request_id: str
    ) -> None:
        """A POST to one of the four endpoints, without Django's request object, URL resolving
        or view wrappers (per request, a third of the gateway's own CPU: bench/README.md):
        `views.serve` takes the method, the key `refuse_before_body` found, and the body."""
        from controlplane.gateway.auth import SCOPE_KEY
        from controlplane.gateway.views import serve

        body = await read_whole(receive)
        if body is None:  # the client left, or the body limit answered it (bodylimit.guard)
            return
        key = scope[SCOPE_KEY]

        async def found(state: object) -> Any:
            return key

        served = serve(api, "POST", found, lambda: body, request_id, header_reader(scope))
        await self.answer_unless_gone(answered(served, request_id), receive, send, request_id)

    async def answer_unless_gone(
        self, answer: Awaitable[HttpResponseBase], receive: Any, send: Any, request_id: str
    ) -> None:
        """Send `answer`'s response, closed once sent; as Django does, a client that
        disconnects cancels it (and so the request to the engine, which the agent cancels in
        turn). Django runs the answer in a task of its own beside the listener and waits for
        either; here it runs in the request's task, which the listener cancels: a task and a
        wait fewer per request."""
        task = asyncio.current_task()
        assert task is not None
        gone = finished = False

        def on_heard(listener: asyncio.Task[None]) -> None:
            nonlocal gone
            if finished or listener.cancelled():
                return
            error = listener.exception()
            if isinstance(error, RequestAborted):
                gone = True
                task.cancel()
            elif error is not None:  # a message after the body that is not a disconnect
                log.error("request %s: %s", request_id, error)

        listener = asyncio.create_task(self.listen_for_disconnect(receive))
        listener.add_done_callback(on_heard)
        response: HttpResponseBase | None = None
        try:
            response = await answer
            response["X-Request-Id"] = request_id  # every answer, errors and 404s included
            await self.send_response(response, send)
        except asyncio.CancelledError:
            # The client went away (before the answer, or while it was sent); otherwise the
            # server's own cancel (a shutdown past WEB_DRAIN_SECONDS), which goes on up.
            if not gone:
                raise
        finally:
            finished = True
            listener.cancel()
            if gone:
                task.uncancel()
            # However it ended: a stream's closers give its claim back and count how it ended.
            if response is not None:
                response.close()

    async def send_response(self, response: Any, send: Any) -> None:
        """Django's, but a streamed answer's chunks go out as the gateway yields them. Django's
        own path passes each chunk through two more generators (`streaming_content`'s
        `make_bytes` and `__aiter__`) and slices it to 64 KiB: per chunk, for nothing, since
        the gateway's streams are async generators of bytes (bench/README.md: the warm path)."""
        if not response.streaming:  # one body, its length declared (uvicorn would chunk it)
            content = response.content
            headers = _headers_of(response)
            if not response.has_header("Content-Length"):
                headers.append((b"content-length", str(len(content)).encode("ascii")))
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": headers})  # fmt: skip
            await send({"type": "http.response.body", "body": content})
            return
        if not response.is_async:
            await super().send_response(response, send)
            return
        await send({"type": "http.response.start", "status": response.status_code,
                    "headers": _headers_of(response)})  # fmt: skip
        async with contextlib.aclosing(response._iterator) as chunks:
            async for chunk in chunks:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body"})


def _headers_of(response: HttpResponseBase) -> list[tuple[bytes, bytes]]:
    """A response's headers for ASGI. (No /v1 answer sets a cookie: Django's own path would
    add them as headers.)"""
    return [
        (str(name).encode("ascii"), str(value).encode("latin1")) for name, value in response.items()
    ]


async def read_whole(receive: Any) -> bytes | None:
    """A request's whole body, or None when the client left first. Its size is bounded where
    it arrives (bodylimit.guard: a declared length over the limit never gets here, a chunked
    one is cut there)."""
    parts = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        parts.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(parts)


def _drop_broken_connections() -> None:
    for connection in connections.all(initialized_only=True):
        if connection.connection is not None and connection.errors_occurred:
            if not connection.is_usable():
                connection.close()
            connection.errors_occurred = False


async def drop_broken_connections() -> None:
    """What close_old_connections does for a request of Django's own handler, for the
    shared ORM thread of the /v1 handler: a connection that failed is closed, so the
    next query opens a fresh one. The gateway's flushers call it once per flush."""
    await sync_to_async(_drop_broken_connections)()
