"""Checks on `/v1/chat/completions` and `/v1/completions` bodies before anything goes upstream.

Only what is checked here is interpreted; every other parameter (vLLM's
extensions included) passes to the engine untouched, as do the body's bytes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


class InvalidRequest(ValueError):
    """A body the gateway refuses: 400 (or `status`) with OpenAI's error fields."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class CompletionRequest:
    model_id: str
    stream: bool
    user: str | None
    raw: bytes
    body: dict[str, Any]


def _number(
    body: dict[str, Any], name: str, low: float, high: float, *, integer: bool = False
) -> None:
    if name not in body or body[name] is None:
        return
    value = body[name]
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        kind = "an integer" if integer else "a number"
        raise InvalidRequest(
            f"'{name}' must be {kind}, not {type(value).__name__}.", name, "invalid_type"
        )
    if not low <= value <= high:
        raise InvalidRequest(
            f"'{name}' must be between {low:g} and {high:g}; got {value}.", name, "invalid_value"
        )


def _boolean(body: dict[str, Any], name: str) -> None:
    if name in body and body[name] is not None and not isinstance(body[name], bool):
        raise InvalidRequest(f"'{name}' must be true or false.", name, "invalid_type")


def _messages(body: dict[str, Any]) -> None:
    messages = body.get("messages")
    if messages is None:
        raise InvalidRequest("'messages' is required.", "messages", "missing_required_parameter")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("'messages' must be a non-empty array.", "messages", "invalid_type")
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{param}' must be an object.", param, "invalid_type")
        if message.get("role") not in _ROLES:
            raise InvalidRequest(
                f"'{param}.role' must be one of {', '.join(sorted(_ROLES))}.",
                f"{param}.role",
                "invalid_value",
            )
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise InvalidRequest(
                f"'{param}.content' must be a string or an array.",
                f"{param}.content",
                "invalid_type",
            )


def _token_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(token, int) and not isinstance(token, bool) for token in value
    )


def _prompt(body: dict[str, Any]) -> None:
    prompt = body.get("prompt")
    if prompt is None:
        raise InvalidRequest("'prompt' is required.", "prompt", "missing_required_parameter")
    if isinstance(prompt, str):
        return
    if (
        isinstance(prompt, list)
        and prompt
        and (
            all(isinstance(item, str) for item in prompt)
            or _token_ids(prompt)
            or all(_token_ids(item) for item in prompt)
        )
    ):
        return
    raise InvalidRequest(
        "'prompt' must be a string, an array of strings or of token ids.", "prompt", "invalid_type"
    )


def parse_completion(raw: bytes, *, chat: bool, max_tokens: int) -> CompletionRequest:
    """The request's routing facts, after checking the parameters the gateway understands."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {exc}", None, "invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", None, "invalid_json")
    model = body.get("model")
    if model is None:
        raise InvalidRequest(
            "You must provide a model parameter.", "model", "missing_required_parameter"
        )
    if not isinstance(model, str) or not model.strip():
        raise InvalidRequest("'model' must be a non-empty string.", "model", "invalid_type")
    if "\x00" in model:  # no catalog id holds one, and PostgreSQL refuses it in a lookup
        raise InvalidRequest("'model' must not contain null characters.", "model", "invalid_value")
    _messages(body) if chat else _prompt(body)
    _boolean(body, "stream")
    for name in ("max_tokens", "max_completion_tokens"):
        _number(body, name, 1, max_tokens, integer=True)
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)
    _number(body, "n", 1, 16, integer=True)
    _number(body, "presence_penalty", -2, 2)
    _number(body, "frequency_penalty", -2, 2)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest(
            "'stream_options' must be an object.", "stream_options", "invalid_type"
        )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string.", "user", "invalid_type")
    return CompletionRequest(model, bool(body.get("stream")), user or None, raw, body)


_NOT_TEXT = {"role", "type"}  # a message's or a content part's own fields, not its text


def _text_bytes(value: Any) -> int:
    """The bytes of text in a prompt or messages value; token ids count four bytes each."""
    if isinstance(value, str):
        return len(value.encode())
    if isinstance(value, int) and not isinstance(value, bool):
        return 4
    if isinstance(value, list):
        return sum(_text_bytes(item) for item in value)
    if isinstance(value, dict):
        return sum(_text_bytes(item) for name, item in value.items() if name not in _NOT_TEXT)
    return 0


def estimate_prompt_tokens(body: dict[str, Any]) -> int:
    """About how many tokens the prompt is (four bytes a token, the usual rule of thumb):
    what a request is charged when the engine never says (a client that left early)."""
    text = _text_bytes(body.get("messages")) + _text_bytes(body.get("prompt"))
    return max(1, (text + 3) // 4)
