"""The body limit (GATEWAY_MAX_BODY_BYTES, which every view and API keeps below anyway), on every
path, enforced where the body arrives: a request whose declared length is over it is answered
413 as soon as its headers are read, and a chunked one as soon as its chunks pass it, the
connection closed and nothing of the body stored.

Under uvicorn (`controlplane.web`) the application is called once the headers are read and
pulls the body itself: `guard` answers a declared length over the limit at once, and counts a
chunked body as Django reads it (Django would spool any length to disk). Daphne reads a
request's whole body before the ASGI application sees the request (Twisted buffers it, in a
temporary file past 100 KB, however long it is): `install` refuses it inside daphne.
"""

from __future__ import annotations

import io
import json
from collections.abc import Awaitable, Callable
from typing import Any

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


# What a multipart upload adds around its file: the boundaries, its fields, their headers.
_ENVELOPE_BYTES = 1024 * 1024


def limit_for(path: bytes | str) -> int:
    """The body limit of a request to `path`: GATEWAY_MAX_BODY_BYTES, and for an upload to
    /v1/files its own (GATEWAY_FILES_MAX_BYTES and the multipart envelope)."""
    from django.conf import settings

    if path in (b"/v1/files", "/v1/files"):
        return max(settings.GATEWAY_FILES_MAX_BYTES + _ENVELOPE_BYTES,
                   settings.GATEWAY_MAX_BODY_BYTES)  # fmt: skip
    return int(settings.GATEWAY_MAX_BODY_BYTES)


def refusal_body(path: bytes, limit: int) -> bytes:
    """The 413's JSON body for a request to `path`, in the shape of the API it was sent to."""
    from controlplane.gateway.errors import openai_error

    message = f"The request body exceeds {limit} bytes."
    if path.startswith(b"/v1/"):
        return bytes(openai_error(413, message, code="request_too_large").content)
    return json.dumps({"detail": message}).encode()


async def guard(scope: dict[str, Any], receive: Receive, send: Send, limit: int) -> Receive | None:
    """What the application reads the request's body with, or None where the request was
    refused here (413 sent, the connection to be closed). A declared length is all the server
    will pass on (it frames the body by it), so only a chunked body is counted as it arrives."""
    declared = None
    for name, value in scope["headers"]:
        if name == b"content-length":
            declared = value.strip()
            break
    if declared is not None:
        if declared.isdigit() and int(declared) > limit:
            await _refuse(scope, send, limit)
            return None
        return receive
    received = 0
    refused = False

    async def counted() -> dict[str, Any]:
        nonlocal received, refused
        if refused:
            return {"type": "http.disconnect"}
        message: dict[str, Any] = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                # Django's reader takes the disconnect for a client gone (RequestAborted) and
                # sends nothing more: the 413 is the answer.
                refused = True
                await _refuse(scope, send, limit)
                return {"type": "http.disconnect"}
        return message

    return counted


async def _refuse(scope: dict[str, Any], send: Send, limit: int) -> None:
    raw = refusal_body(scope.get("raw_path") or scope["path"].encode(), limit)
    await send({"type": "http.response.start", "status": 413, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode()),
        (b"connection", b"close"),  # the rest of the body is not read
    ]})  # fmt: skip
    await send({"type": "http.response.body", "body": raw})


def refusal(path: bytes, limit: int) -> bytes:
    """The raw HTTP 413 for a request to `path` (Twisted answers it: no Django response is sent
    here, only its bytes)."""
    raw = refusal_body(path, limit)
    head = (
        "HTTP/1.1 413 Request Entity Too Large\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + raw


def install(limit: int) -> None:
    """Make daphne's requests refuse bodies over `limit` bytes as they arrive (daphne only)."""
    from daphne import http_protocol

    base: Any = http_protocol.WebRequest
    if getattr(base, "body_limit", None) == limit:
        return

    class LimitedRequest(base):
        body_limit = limit

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.body_received = 0
            self.body_refused = False

        def _limit(self) -> int:
            path = getattr(self.channel, "_path", b"").split(b"?")[0]
            return limit_for(path) if path == b"/v1/files" else self.body_limit

        def gotLength(self, length: int | None) -> None:
            if length is not None and length > self._limit():
                self._refuse()
                return
            super().gotLength(length)

        def handleContentChunk(self, data: bytes) -> None:
            if self.body_refused:
                return
            self.body_received += len(data)
            if self.body_received > self._limit():
                self._refuse()
                return
            super().handleContentChunk(data)

        def process(self) -> None:
            if not self.body_refused:  # a refused request goes no further than its 413
                super().process()

        def _refuse(self) -> None:
            self.body_refused = True
            self.content = io.BytesIO()
            # Twisted would answer "100 Continue" next: the client must not send the body.
            self.requestHeaders.removeHeader(b"expect")
            channel = self.channel
            channel.transport.write(refusal(getattr(channel, "_path", b""), self._limit()))
            channel.loseConnection()

    http_protocol.WebRequest = LimitedRequest
