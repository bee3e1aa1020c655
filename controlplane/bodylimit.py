"""Daphne reads a request's whole body before the ASGI application sees the request: Twisted
buffers it, in a temporary file past 100 KB, however long it is. So the body limit
(GATEWAY_MAX_BODY_BYTES, which every view and API keeps below anyway) is enforced where the
body arrives: a request whose declared length is over it is answered 413 as soon as its
headers are read, and a chunked one as soon as its chunks pass it, the connection closed and
nothing of the body stored.
"""

from __future__ import annotations

import io
import json
from typing import Any


def refusal(path: bytes, limit: int) -> bytes:
    """The raw HTTP 413 for a request to `path`, in the shape of the API it was sent to (Twisted
    answers it: no Django response is sent here, only its bytes)."""
    from controlplane.gateway.errors import openai_error

    message = f"The request body exceeds {limit} bytes."
    if path.startswith(b"/v1/"):
        raw = openai_error(413, message, code="request_too_large").content
    else:
        raw = json.dumps({"detail": message}).encode()
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

        def gotLength(self, length: int | None) -> None:
            if length is not None and length > self.body_limit:
                self._refuse()
                return
            super().gotLength(length)

        def handleContentChunk(self, data: bytes) -> None:
            if self.body_refused:
                return
            self.body_received += len(data)
            if self.body_received > self.body_limit:
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
            channel.transport.write(refusal(getattr(channel, "_path", b""), self.body_limit))
            channel.loseConnection()

    http_protocol.WebRequest = LimitedRequest
