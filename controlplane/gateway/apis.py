"""The OpenAI APIs the gateway serves, and how each one's answers differ on the wire.

Chat and text completions stream `data: {...}` chunks ending in `data: [DONE]`;
the Responses API streams typed events (`event: response.output_text.delta`)
whose last, `response.completed`, carries the usage; embeddings never stream.
Everything else (routing, cold starts, failover, limits) is the same for all.
"""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Any

from agents.choices import ModelKind

# The Responses events that carry the model's output as it is made (what "relayed" counts).
_OUTPUT_EVENTS = (b"event: response.output_text.delta", b"event: response.reasoning_text.delta")
# The Responses events that end a response; each carries the response, with its usage.
_FINAL_EVENTS = (b"response.completed", b"response.incomplete", b"response.failed")


class Api(StrEnum):
    """An endpoint under /v1/, by its path there."""

    CHAT = "chat/completions"
    COMPLETIONS = "completions"
    RESPONSES = "responses"
    EMBEDDINGS = "embeddings"

    @property
    def kind(self) -> ModelKind:
        """The kind of model that serves it."""
        return ModelKind.EMBEDDING if self is Api.EMBEDDINGS else ModelKind.GENERATE

    @property
    def asks_for_usage(self) -> bool:
        """Whether a stream's usage must be asked for (`stream_options.include_usage`):
        completions only; a response's last event always has it."""
        return self in (Api.CHAT, Api.COMPLETIONS)

    def error_event(self, message: str, code: str = "upstream_failed") -> bytes:
        """An OpenAI-shaped error as the last event of a stream whose headers are sent. The
        SDKs raise APIError on a data object with an `error` member, typed events included."""
        error = {"message": message, "type": "server_error", "param": None, "code": code}
        if self is Api.RESPONSES:
            event = {**error, "type": "error", "error": error}
            return f"event: error\ndata: {json.dumps(event)}\n\n".encode()
        return f"data: {json.dumps({'error': error})}\n\ndata: [DONE]\n\n".encode()

    def is_output(self, event: bytes) -> bool:
        """Whether one SSE event carries generated output (a token's worth, or more)."""
        if self is Api.RESPONSES:
            return event.startswith(_OUTPUT_EVENTS)
        return event.startswith(b"data: {") and not event.startswith(b'data: {"error"')

    def count_outputs(self, chunk: bytes) -> int:
        """How many of the whole events in `chunk` carry generated output (`is_output`), by a
        scan: an event starts the chunk or follows a blank line, and a raw newline never
        appears inside an event's JSON."""
        if self is Api.RESPONSES:
            return sum(
                chunk.startswith(name) + chunk.count(b"\n\n" + name) for name in _OUTPUT_EVENTS
            )
        data = chunk.startswith(b"data: {") + chunk.count(b"\n\ndata: {")
        errors = chunk.startswith(b'data: {"error"') + chunk.count(b'\n\ndata: {"error"')
        return data - errors

    def has_output(self, chunk: bytes) -> bool:
        """Whether relayed bytes (whole events) hold generated output: the first token."""
        if self is Api.RESPONSES:
            return any(name in chunk for name in _OUTPUT_EVENTS)
        return chunk.startswith(b"data: {") and not chunk.startswith(b'data: {"error"')

    def is_error(self, chunk: bytes) -> bool:
        """Whether relayed bytes end the stream with an error event."""
        if self is Api.RESPONSES:
            return chunk.startswith(b"event: error\n") or b"\n\nevent: error\n" in chunk
        return chunk.startswith(b'data: {"error"')

    def stream_usage(self, event: bytes) -> dict[str, Any] | None:
        """The usage an SSE event reports for the whole request, if it is that event."""
        if self is Api.RESPONSES:
            if not any(name in event[:64] for name in _FINAL_EVENTS):
                return None
            data = _event_data(event)
            response = data.get("response") if isinstance(data, dict) else None
            usage = response.get("usage") if isinstance(response, dict) else None
            return usage if isinstance(usage, dict) and usage else None
        data = _event_data(event)
        if isinstance(data, dict) and data.get("usage") and not data.get("choices"):
            usage = data["usage"]
            return usage if isinstance(usage, dict) else None
        return None


def _event_data(event: bytes) -> Any:
    """The JSON of an SSE event's `data:` line; None when it has none or it is not JSON."""
    for line in event.split(b"\n"):
        if line.startswith(b"data: "):
            try:
                return json.loads(line[6:])
            except ValueError:
                return None
    return None


def usage_tokens(usage: dict[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of an engine's usage, in either API's names: completions
    and embeddings say prompt_tokens/completion_tokens, responses input_tokens/output_tokens."""
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return _count(prompt), _count(completion)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


# The four POST endpoints by their full paths: the /v1 handler serves these itself, without
# Django's request object (handler.ApiHandler.serve_api; views.py serves the same through it).
API_BY_PATH = {f"/v1/{api.value}": api for api in Api}
