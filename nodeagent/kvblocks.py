"""KV blocks as precise routing names them: one hash per full block of prompt tokens.

An engine with automatic prefix caching keeps a prompt's KV in blocks of `block_size`
tokens, each keyed by its tokens and every block before it. The engine's own keys are of
no use outside it (vLLM's start from a seed drawn at random per process unless
PYTHONHASHSEED is set, and mix in what the engine alone knows), so the agent renames every
block an engine reports (`nodeagent.kvevents`) with `block_chain`, from the block's token
ids and its parent's name, and the gateway names a request's blocks the same way from the
tokens it expects the engine to see. Where both name a block alike, that replica holds
it.

The names are blake2b digests, not Python's `hash`: agents and web processes run on other
hosts and interpreters, and must agree. The chain starts from the served model's name (an
adapter's own: its KV is not its base's).

Also here: how the simulated engine reads a prompt (its "tokens" are the prompt's words,
each named by its CRC-32), which the gateway reproduces to route to simulated engines as
it would to vLLM.
"""

from __future__ import annotations

import hashlib
import json
import sys
import zlib
from array import array
from collections.abc import Sequence
from typing import Any

_ROOT_PERSON = b"llmfleet-kvroot"
_BLOCK_PERSON = b"llmfleet-kvblk"
TOKEN_LIMIT = 2**32  # token ids are packed as 32-bit unsigned integers


def chain_root(served_name: str) -> int:
    """The name of the (empty) prefix before a served model's first block."""
    digest = hashlib.blake2b(served_name.encode(), digest_size=8, person=_ROOT_PERSON)
    return int.from_bytes(digest.digest(), "big")


def _packed(tokens: Sequence[int]) -> bytes:
    packed = array("I", tokens)
    if sys.byteorder != "little":  # the same bytes on every host
        packed.byteswap()
    return packed.tobytes()


def block_chain(
    tokens: Sequence[int], block_size: int, parent: int, limit: int | None = None
) -> list[int]:
    """The names of the full blocks of `tokens` (at most `limit`), each chained to the one
    before it; `parent` names what precedes the first (`chain_root` at a prompt's start).
    Raises OverflowError for a token id outside 0..2**32-1."""
    names: list[int] = []
    whole = len(tokens) // block_size if block_size > 0 else 0
    if limit is not None:
        whole = min(whole, limit)
    blake2b = hashlib.blake2b
    for start in range(0, whole * block_size, block_size):
        data = parent.to_bytes(8, "big") + _packed(tokens[start : start + block_size])
        parent = int.from_bytes(blake2b(data, digest_size=8, person=_BLOCK_PERSON).digest(), "big")
        names.append(parent)
    return names


# --- the simulated engine's reading of a prompt ---------------------------------------------------


def word_ids(text: str) -> list[int]:
    """The simulated engine's tokens: the text's words, each named by its CRC-32."""
    crc32 = zlib.crc32
    return [crc32(word.encode("utf-8", "surrogatepass")) for word in text.split()]


def sim_responses_text(body: dict[str, Any]) -> str:
    """A Responses `input` (a string or items with content) and `instructions`, as text."""
    value = body.get("input", "")
    parts = [str(body["instructions"])] if body.get("instructions") else []
    if isinstance(value, str):
        return "\n".join([*parts, value])
    for item in value if isinstance(value, list) else []:
        content = item.get("content", "") if isinstance(item, dict) else ""
        if isinstance(content, list):
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        parts.append(str(content))
    return "\n".join(parts)


def sim_prompt(body: dict[str, Any], chat: bool) -> str:
    """The prompt as the simulated engine reads it (chat: every message's content)."""
    if chat:
        messages = body.get("messages")
        return "\n".join(
            str(message.get("content", ""))
            for message in (messages if isinstance(messages, list) else ())
            if isinstance(message, dict)
        )
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)
