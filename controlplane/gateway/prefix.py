"""A request's prompt prefix as routing sees it, and where each prefix was last sent.

An engine's prefix cache (vLLM's automatic prefix caching) keeps the KV blocks of the
prompts it served, keyed by everything before them: a request whose prompt starts as an
earlier one's did skips that part of its prefill, on the engine that served the earlier
one only. So the gateway reads each request's prompt in the order the engine will see it
(chat: the tools, then every message; completions: the prompt; responses: the
instructions, then the input), cuts it into chunks of CHUNK_BYTES and chains their hashes:
a chunk's hash stands for the whole prompt up to its end. `PrefixIndex` remembers which
replicas each chunk was last sent to; the replica holding the longest run of a request's
chunks is where most of its prompt is likely cached (agents.scheduling:
choose_cached_replica weighs that against load).

Bounded per request: at most GATEWAY_PREFIX_HASH_KIB of a prompt is read (a 1 MB prompt
costs what 64 KiB does), and each piece is cut before it is encoded. Bounded per process:
the index holds at most GATEWAY_PREFIX_INDEX_MIB's worth of entries, least recently used
out first. An adapter's prefixes are its own (its KV is not the base's): the chain starts
from the model's key, adapter included.

The first chunk's hash is also the prefix's `home`: a digest every web process computes
alike, so that a prefix none of them has seen goes to the same replica from all of them.
Later chunks use Python's own bytes hash (process-local, and several times faster), since
only this process's index compares them.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections import OrderedDict
from collections.abc import Collection, Iterator
from dataclasses import dataclass
from typing import Any

from controlplane.gateway.apis import Api

CHUNK_BYTES = 512  # about 128 tokens: 8 of vLLM's 16-token KV blocks
# What one index entry costs in memory, all told (its key, the holders' tuple, the ordered
# dict's node and table), with room to spare: measured about 300 bytes on CPython 3.11 with
# two holders (tests/gateway/test_prefix.py holds a full index to its budget).
ENTRY_BYTES = 400
# A chunk remembers this many replicas, the most recent first: a hot prefix is served from
# several, and any of them is a hit.
HOLDERS = 4
_SEPARATOR = b"\x1e"


@dataclass(frozen=True)
class Prefix:
    """One request's prefix: the model's key (adapter included), its chained chunk hashes,
    and its home (the first chunk's digest; None when the prompt is shorter than a chunk)."""

    key: str
    chunks: tuple[int, ...]
    home: str | None


def _text(value: Any) -> str:
    """Content as the engine's template renders it, near enough: text as it is; anything else
    (tools, tool calls, audio) by its JSON, which is as stable as the request (and as large:
    bounded by GATEWAY_MAX_BODY_BYTES). JSON too deep for Python's stack is named by its type:
    such a request still routes, by its other pieces."""
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    except (RecursionError, ValueError, TypeError):
        return f"<{type(value).__name__}>"


def _content_parts(content: Any) -> Iterator[str]:
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                yield part["text"]
            elif isinstance(part, dict) and isinstance(part.get("image_url"), dict):
                # An image by its URL (a data: URL is the image): a string the cap can cut
                # before it is copied, where its JSON would copy it whole.
                yield str(part["image_url"].get("url", ""))
            else:
                yield _text(part)
    elif content is not None:
        yield _text(content)


def _pieces(api: Api, body: dict[str, Any]) -> Iterator[str]:
    """The prompt's pieces in the order the engine reads them."""
    if api is Api.CHAT:
        if body.get("tools"):
            yield _text(body["tools"])
        for message in body.get("messages") or ():
            if not isinstance(message, dict):
                continue
            yield str(message.get("role", ""))
            yield from _content_parts(message.get("content"))
            if message.get("tool_calls"):
                yield _text(message["tool_calls"])
    elif api is Api.COMPLETIONS:
        yield _text(body.get("prompt", ""))
    elif api is Api.RESPONSES:
        if body.get("instructions"):
            yield _text(body["instructions"])
        if body.get("tools"):
            yield _text(body["tools"])
        items = body.get("input", "")
        if isinstance(items, str):
            yield items
            return
        for item in items if isinstance(items, list) else ():
            if isinstance(item, dict):
                yield str(item.get("role", item.get("type", "")))
                yield from _content_parts(item.get("content", item.get("output")))
            else:
                yield _text(item)


def prompt_bytes(api: Api, body: dict[str, Any], cap: int) -> bytes:
    """At most `cap` bytes of the prompt, pieces separated; no piece is encoded whole when
    the cap cuts it (a str's characters are at most 4 bytes each)."""
    out = bytearray()
    for piece in _pieces(api, body):
        room = cap - len(out)
        if room <= 0:
            break
        out += piece[:room].encode("utf-8", "surrogatepass")[:room]
        out += _SEPARATOR
    return bytes(out[:cap])


def prefix_of(api: Api, body: dict[str, Any], key: str, cap: int) -> Prefix:
    """The request's prefix for the model `key` (embeddings have none: no KV cache)."""
    key = sys.intern(key)  # one copy in the index, however many requests name it
    if api is Api.EMBEDDINGS:
        return Prefix(key, (), None)
    raw = prompt_bytes(api, body, cap)
    whole = len(raw) // CHUNK_BYTES
    if not whole:
        return Prefix(key, (), None)
    # The model's key hashed first: blake2b takes a key of 64 bytes at most, and two long
    # adapter names must not share a home by their first 64 bytes.
    salt = hashlib.blake2b(key.encode(), digest_size=32).digest()
    first = hashlib.blake2b(raw[:CHUNK_BYTES], digest_size=8, person=b"llmfleet",
                            key=salt).digest()  # fmt: skip
    link = int.from_bytes(first, "big")
    chunks = [link]
    for start in range(CHUNK_BYTES, whole * CHUNK_BYTES, CHUNK_BYTES):
        link = hash((link, raw[start : start + CHUNK_BYTES]))
        chunks.append(link)
    return Prefix(key, tuple(chunks), first.hex())


class PrefixIndex:
    """Which replicas each chunk of a prefix was last sent to, for every model this process
    routes; least recently used out past `max_entries`."""

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max(max_entries, 1)
        self.entries: OrderedDict[tuple[str, int], tuple[str, ...]] = OrderedDict()

    @classmethod
    def of_mib(cls, mib: int) -> PrefixIndex:
        return cls(mib * 1024 * 1024 // ENTRY_BYTES)

    def match(self, prefix: Prefix, replicas: Collection[str]) -> dict[str, int]:
        """How many leading chunks of the prefix each of `replicas` was sent (those with none
        left out). A chunk's hash stands for all before it, so a holder of chunk n holds the
        first n; the walk stops at the first chunk none of them holds."""
        found: dict[str, int] = {}
        for depth, chunk in enumerate(prefix.chunks, start=1):
            holders = self.entries.get((prefix.key, chunk))
            live = [replica for replica in holders or () if replica in replicas]
            if not live:
                break
            for replica in live:
                found[replica] = depth
        return found

    def record(self, prefix: Prefix, replica: str) -> int:
        """The prefix was sent to `replica`: it leads every chunk's holders now. Returns how
        many of its chunks this index did not list for `replica`: what its engine likely
        prefilled and its cache took in, pushing older prefixes out. Likely: the index
        outlives the engine's cache, so a prefix evicted there and sent again counts 0, and
        another web process's requests are not seen here."""
        # One copy of each replica name, however many entries and requests name them (each
        # request brings its own strings; `prefix_of` interns the key): an entry's cost stays
        # ENTRY_BYTES.
        replica = sys.intern(replica)
        entries = self.entries
        new = 0
        # Last to first: the first chunk ends most recent, and is evicted last (every longer
        # prefix needs it).
        for chunk in reversed(prefix.chunks):
            entry = (prefix.key, chunk)
            holders = entries.get(entry)
            if holders is None:
                entries[entry] = (replica,)
                new += 1
            else:
                if holders[0] != replica:
                    new += replica not in holders
                    kept = tuple(h for h in holders if h != replica)[: HOLDERS - 1]
                    entries[entry] = (replica, *kept)
                entries.move_to_end(entry)
        while len(entries) > self.max_entries:
            entries.popitem(last=False)
        return new


class Traffic:
    """How much new prompt this process sent each replica lately: chunks its index did not
    list for it (`PrefixIndex.record`), halved every HALF_LIFE seconds. Each replica's share of new
    prefixes is bounded by it (agents.scheduling.HomeBound). New chunks, not all of them: a
    hot prefix's hits cost its replica neither prefill nor cache room, and counting them
    sent new prefixes away from a replica whose cache had room (bench/README.md, issue 29)."""

    # Long enough to even out bursts, short enough that a replica added or emptied is seen
    # within minutes.
    HALF_LIFE = 60.0
    # The bound's minimum: below this much recent traffic, shares are noise
    # (HomeBound.min_total). 512 new chunks: 256 KiB of prompts the caches took in.
    MIN_TOTAL = 512.0

    def __init__(self) -> None:
        self.volumes: dict[str, tuple[float, float]] = {}  # replica → (volume, as of)

    def add(self, replica: str, chunks: int, now: float) -> None:
        self.volumes[replica] = (self.of(replica, now) + chunks, now)
        if len(self.volumes) > 4096:  # replicas come and go: forget the faded
            for key in [k for k in self.volumes if self.of(k, now) < 1.0]:
                del self.volumes[key]

    def of(self, replica: str, now: float) -> float:
        volume, at = self.volumes.get(replica, (0.0, now))
        # A request that read `now` before another's add landed: no growth, no decay.
        return volume * float(0.5 ** (max(0.0, now - at) / self.HALF_LIFE))
