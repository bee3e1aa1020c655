"""What the simulated engine answers: deterministic words and embeddings, in vLLM's shapes.

The same prompt always gets the same words (`words_for`) and the same text the same
unit vector (`embedding_for`), so tests and benchmarks can check an answer without
an engine; the bodies are those vLLM's OpenAI-compatible server sends (completions,
chat completions, the Responses API).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
import uuid
from typing import Any

WORDS = (
    "the",
    "fleet",
    "serves",
    "every",
    "model",
    "on",
    "demand",
    "while",
    "idle",
    "engines",
    "sleep",
    "and",
    "wake",
    "as",
    "requests",
    "arrive",
    "from",
    "clients",
    "across",
    "regions",
    "with",
    "tokens",
    "streaming",
    "back",
    "quickly",
    "through",
    "agents",
)


def words_for(prompt: str, count: int) -> list[str]:
    """`count` words chosen by the prompt's hash: the same prompt always gets the same text."""
    seed = hashlib.sha256(prompt.encode()).digest()
    return [WORDS[(seed[i % len(seed)] + i * 7) % len(WORDS)] for i in range(count)]


EMBEDDING_DIMENSIONS = 16


def embedding_for(text: str, dimensions: int = EMBEDDING_DIMENSIONS) -> list[float]:
    """A unit vector chosen by the text's hash: the same text always gets the same one."""
    seeded = random.Random(hashlib.sha256(text.encode()).digest())  # noqa: S311 (not secret)
    vector = [seeded.gauss() for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def input_texts(value: Any) -> list[str] | None:
    """An embeddings `input` as texts (token ids as their JSON), None when it is none."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, str) for item in value):
            return list(value)
        if all(isinstance(item, int) for item in value):
            return [json.dumps(value)]
        if all(isinstance(item, list) for item in value):
            return [json.dumps(item) for item in value]
    return None


def response_object(model_id: str, body: dict[str, Any], usage: dict[str, int]) -> dict[str, Any]:
    """A Responses API response while in progress; as vLLM without its store, `store` false."""
    return {
        "id": f"resp_{uuid.uuid4().hex}", "object": "response", "created_at": int(time.time()),
        "model": model_id, "status": "in_progress", "output": [], "usage": None,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "temperature": body.get("temperature", 1.0), "top_p": body.get("top_p", 1.0),
        "tool_choice": "none", "tools": [], "parallel_tool_calls": True, "store": False,
        "background": False, "previous_response_id": None, "metadata": body.get("metadata"),
        "incomplete_details": None, "truncation": "disabled", "text": None, "user": None,
    }  # fmt: skip


def finished_response(response: dict[str, Any], text: str, usage: dict[str, int]) -> dict[str, Any]:
    """The Responses API response once its text is complete."""
    message = {
        "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }  # fmt: skip
    return {**response, "status": "completed", "output": [message], "usage": usage}


def completion_body(chat: bool, text: str, usage: dict[str, int], model: str) -> dict[str, Any]:
    """A whole (not streamed) completion or chat completion, as vLLM answers it."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
    if chat:
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "object": "chat.completion" if chat else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": usage,
    }
