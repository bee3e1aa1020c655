"""Checks on `/v1/chat/completions`, `/v1/completions`, `/v1/responses` and `/v1/embeddings`
bodies before anything goes upstream.

Only what is checked here is interpreted; every other parameter (vLLM's
extensions included) passes to the engine untouched, as do the body's bytes.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Any

from controlplane.gateway.apis import Api

_ROLES = {"system", "developer", "user", "assistant", "tool", "function"}


class InvalidRequest(ValueError):
    """A body the gateway refuses: 400 (or `status`) with OpenAI's error fields."""

    def __init__(
        self, message: str, param: str | None = None, code: str | None = None, status: int = 400
    ) -> None:
        super().__init__(message)
        self.param, self.code, self.status = param, code, status


@dataclass(frozen=True)
class ApiRequest:
    model_id: str
    stream: bool
    user: str | None
    raw: bytes  # the body to send upstream: the client's bytes, less what is llmfleet's own
    body: dict[str, Any]
    # Seconds the serving replica should stay on the GPU once idle (`keep_alive`); math.inf
    # for "as long as allowed"; None when the request did not say.
    keep_alive: float | None = None
    # The most tokens the answer may have: the request's own cap, else the default the gateway
    # set in `raw` (what a tokens-per-minute limit reserves). 0 for embeddings.
    max_tokens: int = 0
    # The admission class the request asked for (`priority_class`, llmfleet's own), if any.
    priority_class: str | None = None


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


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
_KEEP_ALIVE_HINT = (
    'seconds (300), or a duration ("5m", "1h30m", "90s"); 0 steps the model down as '
    "soon as it is idle, a negative value keeps it as long as the model allows"
)


def parse_keep_alive(value: Any) -> float:
    """`keep_alive` as Ollama's clients send it: a number of seconds, or a Go-style duration
    string ("5m", "1h30m", "-1"). Negative means as long as allowed (math.inf)."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise InvalidRequest(
            f"'keep_alive' must be {_KEEP_ALIVE_HINT}.", "keep_alive", "invalid_type"
        )
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        if text.startswith(("-", "+")):
            text = text[1:]
        try:
            if text.startswith(("-", "+")):  # one sign, and only before the number
                raise ValueError(value)
            seconds = float(text)  # "300": seconds, as a number would say
        except ValueError:
            parts = _DURATION_PART.findall(text)
            if not text or "".join(number + unit for number, unit in parts) != text:
                raise InvalidRequest(
                    f"'keep_alive' {value!r} is not {_KEEP_ALIVE_HINT}.",
                    "keep_alive",
                    "invalid_value",
                ) from None
            seconds = sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)
        value = sign * seconds
    if not math.isfinite(value):
        raise InvalidRequest(
            f"'keep_alive' must be {_KEEP_ALIVE_HINT}.", "keep_alive", "invalid_value"
        )
    return math.inf if value < 0 else float(value)


def _responses_input(body: dict[str, Any]) -> None:
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise InvalidRequest("'instructions' must be a string.", "instructions", "invalid_type")
    value = body.get("input")
    if value is None:
        raise InvalidRequest("'input' is required.", "input", "missing_required_parameter")
    if isinstance(value, str):
        return
    if not isinstance(value, list) or not value:
        raise InvalidRequest(
            "'input' must be a string or a non-empty array of input items.", "input", "invalid_type"
        )
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidRequest(
                f"'input[{index}]' must be an object.", f"input[{index}]", "invalid_type"
            )
        role = item.get("role")
        if role is not None and role not in _ROLES:
            raise InvalidRequest(
                f"'input[{index}].role' must be one of {', '.join(sorted(_ROLES))}.",
                f"input[{index}].role",
                "invalid_value",
            )


# What llmfleet cannot honour across replicas: an engine keeps a response in its own memory
# only, and the next request (or the GET) may reach another replica, or find it evicted.
_NOT_KEPT = (
    "llmfleet does not keep responses between requests: any replica may answer the next one, "
    "and an engine's memory goes when it is stepped down."
)


def _responses_state(body: dict[str, Any]) -> None:
    if body.get("previous_response_id") is not None:
        raise InvalidRequest(
            f"'previous_response_id' is not supported: {_NOT_KEPT} Send the earlier turns "
            "in 'input' instead.",
            "previous_response_id",
            "unsupported_parameter",
        )
    _boolean(body, "background")
    if body.get("background"):
        raise InvalidRequest(
            f"'background' is not supported: {_NOT_KEPT} Stream the response instead.",
            "background",
            "unsupported_parameter",
        )
    _boolean(body, "store")


def _embeddings_input(body: dict[str, Any]) -> None:
    value = body.get("input")
    if value is None:
        raise InvalidRequest("'input' is required.", "input", "missing_required_parameter")
    if isinstance(value, str) or (
        isinstance(value, list)
        and value
        and (
            all(isinstance(item, str) for item in value)
            or _token_ids(value)
            or all(_token_ids(item) and item for item in value)
        )
    ):
        return
    raise InvalidRequest(
        "'input' must be a string, a non-empty array of strings, an array of token ids or an "
        "array of arrays of token ids.",
        "input",
        "invalid_type",
    )


def _embeddings_options(body: dict[str, Any]) -> None:
    encoding = body.get("encoding_format")
    if encoding is not None and encoding not in ("float", "base64"):
        raise InvalidRequest(
            "'encoding_format' must be 'float' or 'base64'.", "encoding_format", "invalid_value"
        )
    _number(body, "dimensions", 1, 1 << 16, integer=True)
    if body.get("stream"):
        raise InvalidRequest(
            "Embeddings are not streamed: leave out 'stream'.", "stream", "invalid_value"
        )


def _body(api: Api, body: dict[str, Any], max_tokens: int) -> None:
    """The checks of each API's own fields."""
    if api is Api.EMBEDDINGS:
        _embeddings_input(body)
        _embeddings_options(body)
        return
    if api is Api.RESPONSES:
        _responses_input(body)
        _responses_state(body)
        _number(body, "max_output_tokens", 1, max_tokens, integer=True)
    else:
        _messages(body) if api is Api.CHAT else _prompt(body)
        for name in ("max_tokens", "max_completion_tokens"):
            _number(body, name, 1, max_tokens, integer=True)
        _number(body, "n", 1, 16, integer=True)
        _number(body, "presence_penalty", -2, 2)
        _number(body, "frequency_penalty", -2, 2)
        options = body.get("stream_options")
        if options is not None and not isinstance(options, dict):
            raise InvalidRequest(
                "'stream_options' must be an object.", "stream_options", "invalid_type"
            )
    _boolean(body, "stream")
    _number(body, "temperature", 0, 2)
    _number(body, "top_p", 0, 1)


# Where each API names its answer's cap.
_CAP_FIELDS = {
    Api.CHAT: ("max_completion_tokens", "max_tokens"),
    Api.COMPLETIONS: ("max_tokens",),
    Api.RESPONSES: ("max_output_tokens",),
}


def _answer_cap(api: Api, body: dict[str, Any], default: int) -> tuple[int, bool]:
    """The answer's cap, and whether the gateway must write `default` into the body: a request
    that does not say would otherwise run to the end of the model's context."""
    fields = _CAP_FIELDS.get(api)
    if fields is None:
        return 0, False
    for name in fields:
        if body.get(name) is not None:
            return int(body[name]), False
    body[fields[-1]] = default
    return default, True


def _priority_class(body: dict[str, Any]) -> str | None:
    value = body.pop("priority_class")
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InvalidRequest(
            "'priority_class' must be a string: interactive or batch.", "priority_class",
            "invalid_type",
        )  # fmt: skip
    return value


def parse_request(
    raw: bytes, api: Api, *, max_tokens: int, default_max_tokens: int | None = None
) -> ApiRequest:
    """The request's routing facts, after checking the parameters the gateway understands.
    A request without a cap on its answer gets `default_max_tokens` (at most `max_tokens`)."""
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
    _body(api, body, max_tokens)
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise InvalidRequest("'user' must be a string.", "user", "invalid_type")
    keep_alive, changed = None, False
    if "keep_alive" in body:  # llmfleet's own: checked here, never sent to the engine
        value = body.pop("keep_alive")
        keep_alive = None if value is None else parse_keep_alive(value)
        changed = True
    priority_class = None
    if "priority_class" in body:  # llmfleet's own too
        priority_class = _priority_class(body)
        changed = True
    default = min(max_tokens, default_max_tokens or max_tokens)
    cap, capped = _answer_cap(api, body, default)
    if changed or capped:
        raw = json.dumps(body).encode()
    return ApiRequest(
        model, bool(body.get("stream")), user or None, raw, body, keep_alive, cap, priority_class
    )


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
    text = sum(
        _text_bytes(body.get(name)) for name in ("messages", "prompt", "input", "instructions")
    )
    return max(1, (text + 3) // 4)
