"""Which KV blocks each engine holds, from the engine's own KV-cache events: precise routing.

vLLM publishes every block it stores in and removes from its prefix cache
(`--kv-events-config`, a ZMQ PUB socket; each message is (topic, sequence number, a
msgpack `KVEventBatch`)). The agent subscribes to each engine it runs (`KvFeed`; the
simulated engine publishes the same messages), renames every block stored with
`nodeagent.kvblocks.block_chain` (from its tokens and its parent's name: the engine's own
keys mean nothing outside it), and keeps the set of names the engine holds. The gateway
follows that set over HTTP (`GET /models/{model}/kv`: the whole set, then each change), so it
sees evictions inside the engine, engines restarted or put to sleep, and every web
process sees the same.

Events the agent cannot use are dropped, each with a log line and a count by reason
(`llmfleet_agent_kv_events_dropped_total`), never an exception out of the feed: a
malformed message or event, a block whose parent the agent never saw stored (events lost
or out of order), a block keyed by more than its tokens and adapter (images, a cache
salt: the gateway cannot name those). A gap in the sequence numbers means events were
lost: the set is emptied (the gateway routes by what it knows to be held, never by what
may be), and fills again with the blocks the engine stores next.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from nodeagent.kvblocks import TOKEN_LIMIT, block_chain, chain_root

log = logging.getLogger(__name__)

EngineKey = bytes | int  # vLLM's ExternalBlockHash
_MEDIUM_GPU = "GPU"
# A follower that falls this many changes behind is cut off (it follows afresh, from the
# whole set): the feed never holds more for a slow reader.
FOLLOWER_BACKLOG = 10_000
# A checkpoint's files the gateway reads a prompt into its engine's tokens with (the agent
# serves them at GET /models/{model}/tokenizer/{file}; the first is required).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")  # fmt: skip
# A follower hears at least an empty line this often (nodeagent.routes' GET /models/{model}/kv).
KV_KEEPALIVE_SECONDS = 15.0
# One log line per reason per this many seconds: a broken publisher must not flood the log.
_LOG_EVERY_SECONDS = 10.0


class BadEvent(ValueError):
    """An event or message the feed cannot use; `reason` labels its count."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class Stored:
    keys: list[EngineKey]
    parent: EngineKey | None
    tokens: list[int]
    block_size: int
    lora_name: str | None


@dataclass(frozen=True)
class Removed:
    keys: list[EngineKey]


@dataclass(frozen=True)
class Cleared:
    pass


Event = Stored | Removed | Cleared


def _key(value: Any) -> EngineKey:
    if isinstance(value, bytes | int) and not isinstance(value, bool):
        return value
    raise BadEvent("malformed", f"a block hash of type {type(value).__name__}")


def _fields(raw: Any) -> tuple[str, dict[str, Any]]:
    """An event's tag and fields: vLLM encodes events as maps tagged by `type`; older ones
    as arrays led by the tag, fields in declaration order."""
    if isinstance(raw, dict):
        tag = raw.get("type")
        return (tag if isinstance(tag, str) else ""), raw
    if isinstance(raw, list) and raw and isinstance(raw[0], str):
        names = {
            "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size",
                            "lora_id", "medium", "lora_name", "extra_keys"),
            "BlockRemoved": ("block_hashes", "medium"),
        }.get(raw[0], ())  # fmt: skip
        return raw[0], dict(zip(names, raw[1:], strict=False))
    raise BadEvent("malformed", f"an event of type {type(raw).__name__}")


def _only_adapter(extra: Any, lora_name: str | None) -> bool:
    """Whether a block's extra keys are its adapter's name at most (vLLM lists, per block,
    the LoRA name, then images' identifiers, the cache salt, prompt embeddings)."""
    if extra is None:
        return True
    if not isinstance(extra, list):
        return False
    for keys in extra:
        if keys is None or (isinstance(keys, list | tuple) and list(keys) in ([], [lora_name])):
            continue
        return False
    return True


def parse_event(raw: Any) -> Event:
    tag, fields = _fields(raw)
    if tag == "AllBlocksCleared":
        return Cleared()
    medium = fields.get("medium")
    if medium not in (None, _MEDIUM_GPU):  # an offloading tier's blocks: not the engine's cache
        raise BadEvent("other_medium", f"a block in {medium!r}")
    keys = fields.get("block_hashes")
    if not isinstance(keys, list):
        raise BadEvent("malformed", f"{tag or 'an event'} without block hashes")
    if tag == "BlockRemoved":
        return Removed([_key(key) for key in keys])
    if tag != "BlockStored":
        raise BadEvent("unknown_type", f"an event of type {tag!r}")
    tokens, size = fields.get("token_ids"), fields.get("block_size")
    parent, lora_name = fields.get("parent_block_hash"), fields.get("lora_name")
    if (
        not isinstance(tokens, list)
        or not isinstance(size, int)
        or size <= 0
        or len(tokens) != len(keys) * size
        or not all(isinstance(t, int) and 0 <= t < TOKEN_LIMIT for t in tokens)
        or not (lora_name is None or isinstance(lora_name, str))
    ):
        raise BadEvent("malformed", "a BlockStored whose tokens are not its blocks'")
    if fields.get("lora_id") is not None and lora_name is None:
        raise BadEvent("unnamed_adapter", "a block of an adapter that has no name")
    if not _only_adapter(fields.get("extra_keys"), lora_name):
        raise BadEvent("extra_keys", "a block keyed by more than its tokens and adapter")
    return Stored(
        [_key(key) for key in keys], None if parent is None else _key(parent), tokens, size,
        lora_name,
    )  # fmt: skip


def parse_batch(payload: bytes) -> list[Event | BadEvent]:
    """A message's events; each event it cannot use as a BadEvent in its place (one bad
    event spoils no other). Raises BadEvent for a message that is not a batch at all."""
    try:
        batch = msgspec.msgpack.decode(payload)
    except msgspec.DecodeError as exc:
        raise BadEvent("malformed", f"not msgpack: {exc}") from None
    if not (isinstance(batch, list) and len(batch) >= 2 and isinstance(batch[1], list)):
        raise BadEvent("malformed", "a message that is not an event batch")
    events: list[Event | BadEvent] = []
    for raw in batch[1]:
        try:
            events.append(parse_event(raw))
        except BadEvent as bad:
            events.append(bad)
    return events


@dataclass(frozen=True)
class Change:
    """What a follower is told: names now held, names no longer held, or all gone."""

    added: tuple[int, ...] = ()
    removed: tuple[int, ...] = ()
    cleared: bool = False


@dataclass
class EngineBlocks:
    """One engine's blocks under their routing names."""

    served: str  # the model the engine serves: its base chain
    block_size: int = 0
    names: dict[EngineKey, int] = field(default_factory=dict)  # engine's key → name
    held: Counter[int] = field(default_factory=Counter)  # name → engine blocks that bear it

    def apply(self, event: Event) -> Change | None:
        """The event applied; what changed for followers, None when nothing did. Raises
        BadEvent for a block whose parent was never stored here."""
        if isinstance(event, Cleared):
            was = bool(self.names)
            self.names.clear()
            self.held.clear()
            return Change(cleared=True) if was else None
        if isinstance(event, Removed):
            removed = []
            for key in event.keys:
                name = self.names.pop(key, None)
                if name is None:
                    continue
                self.held[name] -= 1
                if self.held[name] <= 0:
                    del self.held[name]
                    removed.append(name)
            return Change(removed=tuple(removed)) if removed else None
        if event.parent is None:
            parent = chain_root(event.lora_name or self.served)
        else:
            known = self.names.get(event.parent)
            if known is None:
                raise BadEvent("unknown_parent", "a block whose parent was not seen stored")
            parent = known
        self.block_size = event.block_size
        added = []
        chain = block_chain(event.tokens, event.block_size, parent)
        for key, name in zip(event.keys, chain, strict=True):
            if key in self.names:  # stored again: the same block
                continue
            self.names[key] = name
            self.held[name] += 1
            if self.held[name] == 1:
                added.append(name)
        return Change(added=tuple(added)) if added else None


# Names per line a follower reads, at most: a line stays well within a client's line buffer
# (aiohttp's is 128 KiB), however many blocks an engine holds.
NAMES_PER_LINE = 2048


def kv_lines(change: Change, block_size: int) -> list[bytes]:
    """A change as a follower reads it: JSON lines."""
    if change.cleared:
        return [b'{"clear":true}\n']
    lines = []
    for key, names in (("add", change.added), ("remove", change.removed)):
        for start in range(0, len(names), NAMES_PER_LINE):
            piece = {"block_size": block_size, key: names[start : start + NAMES_PER_LINE]}
            lines.append(json.dumps(piece).encode() + b"\n")
    return lines


def kv_head(model_id: str, engine: str, block_size: int, names: list[int]) -> list[bytes]:
    """A feed's first lines: what it is, then every name held (in lines of NAMES_PER_LINE)."""
    head = {"model": model_id, "engine": engine, "tokens": kv_tokens(engine),
            "block_size": block_size, "add": names[:NAMES_PER_LINE]}  # fmt: skip
    rest = kv_lines(Change(added=tuple(names[NAMES_PER_LINE:])), block_size)
    return [json.dumps(head).encode() + b"\n", *rest]


def kv_tokens(engine: str) -> str:
    """How the gateway is to read a prompt into the engine's tokens: the simulated engine's
    words, or the model's own tokenizer and chat template."""
    return "words" if engine == "sim" else "model"


class Follower:
    """One reader of a feed: its changes in order, or the end (cut off, or the feed closed)."""

    def __init__(self) -> None:
        self.changes: asyncio.Queue[Change | None] = asyncio.Queue()
        self.cut = False

    def put(self, change: Change | None) -> None:
        if self.cut:
            return
        if change is not None and self.changes.qsize() >= FOLLOWER_BACKLOG:
            self.cut, change = True, None
        self.changes.put_nowait(change)


class KvFeed:
    """One engine's KV events, as followers read them: subscribed while the engine runs."""

    def __init__(self, served: str, dropped: Callable[[str], None]) -> None:
        self.blocks = EngineBlocks(served)
        self.followers: set[Follower] = set()
        self._dropped = dropped
        self._last_seq: int | None = None
        self._logged: dict[str, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.closed = False
        # The agent binds, the engine connects (vLLM connects to a tcp:// endpoint without a
        # wildcard): the port is the agent's before the engine starts, on loopback only.
        self._socket = zmq.asyncio.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.bind("tcp://127.0.0.1:*")
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)

    def vllm_config(self) -> str:
        """vLLM's --kv-events-config, publishing to this feed."""
        return json.dumps({"enable_kv_cache_events": True, "publisher": "zmq",
                           "endpoint": self.endpoint, "topic": ""})  # fmt: skip

    def start(self) -> None:
        """Read the engine's events from now on (it serves)."""
        self._task = asyncio.create_task(self._receive())

    def follow(self) -> tuple[int, list[int], Follower]:
        """The block size, the names held now, and what changes from here."""
        follower = Follower()
        if self.closed:  # its engine is gone: the follower hears the end at once
            follower.put(None)
            return self.blocks.block_size, [], follower
        self.followers.add(follower)
        return self.blocks.block_size, list(self.blocks.held), follower

    def unfollow(self, follower: Follower) -> None:
        self.followers.discard(follower)

    def clear(self) -> None:
        """The engine's cache is gone (it sleeps): so is the set."""
        self._tell(self.blocks.apply(Cleared()))

    async def close(self) -> None:
        """The engine is gone: followers are told so, the subscription ends. Twice is
        harmless."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
            except Exception:  # its end is logged; the followers are told all the same
                log.exception("%s: the KV event subscription failed", self.blocks.served)
        self.discard()

    def discard(self) -> None:
        """Close without waiting: the socket, and every follower told the feed ended."""
        if self._task is not None:
            self._task.cancel()
        self.closed = True
        self._socket.close()
        for follower in self.followers:
            follower.put(None)
        self.followers.clear()

    def _tell(self, change: Change | None) -> None:
        if change is not None:
            for follower in self.followers:
                follower.put(change)

    def _drop(self, bad: BadEvent) -> None:
        self._dropped(bad.reason)
        now = time.monotonic()
        if now - self._logged.get(bad.reason, -1e9) >= _LOG_EVERY_SECONDS:
            self._logged[bad.reason] = now
            log.warning("%s: KV event dropped (%s): %s", self.blocks.served, bad.reason, bad)

    def take(self, frames: list[bytes]) -> None:
        """One message from the engine, applied."""
        if len(frames) != 3 or len(frames[1]) != 8:
            self._drop(BadEvent("malformed", f"a message of {len(frames)} frames"))
            return
        seq = int.from_bytes(frames[1], "big")
        if self._last_seq is not None and seq != self._last_seq + 1:
            self._drop(BadEvent("gap", f"sequence {seq} after {self._last_seq}: events lost"))
            self._tell(self.blocks.apply(Cleared()))
        self._last_seq = seq
        try:
            events = parse_batch(frames[2])
        except BadEvent as bad:
            self._drop(bad)
            return
        for event in events:
            if isinstance(event, BadEvent):
                self._drop(event)
                continue
            try:
                self._tell(self.blocks.apply(event))
            except BadEvent as bad:
                self._drop(bad)

    async def _receive(self) -> None:
        try:
            while True:
                self.take(await self._socket.recv_multipart())
        except zmq.ZMQError:
            log.exception("%s: the KV event subscription failed", self.blocks.served)
            self._task = None
            self.discard()  # its followers end, and follow again (to an empty feed)


class KvEventPublisher:
    """KV events published as vLLM publishes them (the simulated engine's): to `endpoint`,
    bound there where it has a wildcard (as vLLM does), else connected to."""

    def __init__(self, endpoint: str) -> None:
        self._socket: zmq.Socket[bytes] = zmq.Context.instance().socket(zmq.PUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        if "*" in endpoint:
            self._socket.bind(endpoint)
        else:
            self._socket.connect(endpoint)
        self.endpoint: str = self._socket.getsockopt_string(zmq.LAST_ENDPOINT) or endpoint
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()

    def _send(self, event: dict[str, Any]) -> None:
        payload = self._encoder.encode([time.time(), [event]])
        with contextlib.suppress(zmq.Again):
            self._socket.send_multipart(
                [b"", self._seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK
            )
        self._seq += 1

    def stored(
        self, keys: list[int], parent: int | None, tokens: Any, block_size: int,
        lora_name: str | None,
    ) -> None:  # fmt: skip
        self._send({"type": "BlockStored", "block_hashes": keys, "parent_block_hash": parent,
                    "token_ids": list(tokens), "block_size": block_size, "lora_id": None,
                    "medium": _MEDIUM_GPU, "lora_name": lora_name})  # fmt: skip

    def removed(self, keys: list[int]) -> None:
        self._send({"type": "BlockRemoved", "block_hashes": keys, "medium": _MEDIUM_GPU})

    def cleared(self) -> None:
        self._send({"type": "AllBlocksCleared"})

    def close(self) -> None:
        self._socket.close()
