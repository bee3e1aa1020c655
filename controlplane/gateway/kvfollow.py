"""Precise routing: the KV blocks each replica's engine holds, from the engine itself.

Under GATEWAY_ROUTING_POLICY=precise each web process follows, for every replica it
routes to, the blocks its engine holds as the engine's KV-cache events say
(`nodeagent.kvevents`, over the agent's `GET /models/{model}/kv`: the whole set, then
each change). A request's prompt is read into the engine's tokens and its full blocks
named as the agent names them (`nodeagent.kvblocks`); a replica's match is how many of
the request's leading blocks it holds. So an engine's own evictions, restarts and sleeps
are seen, and every web process, following the same agents, routes alike.

Which tokens: the agent says (`tokens` in the feed's first line). `words` is the
simulated engine's reading; `model` is vLLM's, the checkpoint's tokenizer and chat
template (controlplane.gateway.tokens), whose files this process fetches from an agent
serving the model the first time it needs them. Until they are read, or where a prompt
is not one the gateway reads as the engine does (images, a template that fails), and
whenever no replica of the model has a live feed (the agent is unreachable, KV events are
off on it, the feed has just started), the request is routed by the approximate index
(`controlplane.gateway.prefix`).

Cost: per request, the prompt read once more (bounded by GATEWAY_PREFIX_HASH_KIB: for
vLLM, its template rendered and the text tokenized) and one blake2b per block; per replica
followed, one connection and a set of its blocks' names (8 bytes each, about 70 in a
Python set) in each web process; per model, its tokenizer in memory. A replica nobody
asks about for FOLLOW_IDLE_SECONDS is no longer followed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import aiohttp

from agents.models import Placement
from controlplane import metrics
from controlplane.gateway.apis import Api
from controlplane.gateway.tokens import ModelTokenizer
from nodeagent.kvblocks import block_chain, chain_root, sim_prompt, sim_responses_text, word_ids
from nodeagent.kvevents import KV_KEEPALIVE_SECONDS, TOKENIZER_FILES

if TYPE_CHECKING:
    from controlplane.gateway.state import GatewayState

log = logging.getLogger(__name__)

FOLLOW_IDLE_SECONDS = 300.0
# The agent writes at least an empty line every KV_KEEPALIVE_SECONDS: silence past this is a
# gone agent (or a cut link), and the replica's blocks are forgotten until it answers again.
_SILENT_SECONDS = 3 * KV_KEEPALIVE_SECONDS
_RETRY_FIRST_SECONDS = 0.5
_RETRY_MAX_SECONDS = 30.0
# A model whose tokenizer could not be fetched or read is tried again after this long.
_TOKENIZER_RETRY_SECONDS = 60.0
# A tokenizer file larger than this is refused (a real one is tens of MB at most).
_TOKENIZER_FILE_LIMIT = 256 * 1024 * 1024
# Blocks a request is matched by, at most: the hash cap bounds it too (a block is at least
# one token of at least one byte).
_MAX_BLOCKS = 4096


class PromptBlocks:
    """One request's prompt as precise routing reads it: its blocks' names for a given
    reading and block size, computed once each."""

    def __init__(self, api: Api, body: dict[str, Any], served: str, target: str, cap: int) -> None:
        self.api = api
        self.body = body
        self.served = served  # the model, or the adapter, named by the request
        self.target = target  # the model whose replicas serve it (an adapter's base)
        self.cap = cap
        self._names: dict[tuple[str, int], list[int] | None] = {}

    def names(
        self, tokens: str, block_size: int, reader: ModelTokenizer | None = None
    ) -> list[int] | None:
        """The names of the prompt's full blocks; None for a reading the gateway lacks
        (`model` without its `reader`)."""
        key = (tokens, block_size)
        if key not in self._names:
            if tokens == "model" and reader is None:
                return None  # not memoized: the reader may come
            self._names[key] = self._read(tokens, block_size, reader)
        return self._names[key]

    def _read(
        self, tokens: str, block_size: int, reader: ModelTokenizer | None
    ) -> list[int] | None:
        if block_size <= 0 or self.api is Api.EMBEDDINGS:
            return None
        if tokens == "model" and reader is not None:
            ids = reader.ids(self.api, self.body, self.cap)
            if ids is None:
                return None
            return block_chain(ids, block_size, chain_root(self.served), _MAX_BLOCKS)
        if tokens != "words":
            return None
        if self.api is Api.RESPONSES:
            text = sim_responses_text(self.body)
        else:
            text = sim_prompt(self.body, self.api is Api.CHAT)
        cut = len(text) > self.cap
        ids = word_ids(text[: self.cap])
        if cut and ids:  # the last word may be cut short
            ids.pop()
        return block_chain(ids, block_size, chain_root(self.served), _MAX_BLOCKS)


@dataclass
class HeldBlocks:
    """One replica's engine's blocks, as its agent says."""

    tokens: str = ""
    block_size: int = 0
    names: set[int] = field(default_factory=set)
    live: bool = False  # the feed's first line has come and the connection stands
    asked: float = field(default_factory=time.monotonic)
    task: asyncio.Future[None] | None = None
    # The replica's row as last asked about: each connection uses its address and credential
    # (either may have changed since following began).
    placement: Placement | None = None

    def apply(self, line: dict[str, Any]) -> None:
        """One line of the feed; ValueError for one that is not the agent's."""
        added, removed = line.get("add", []), line.get("remove", [])
        if not (isinstance(added, list) and isinstance(removed, list)):
            raise ValueError("a line whose blocks are not lists")
        if line.get("clear"):
            self.names.clear()
        self.names.difference_update(removed)
        self.names.update(added)
        size = line.get("block_size")
        if isinstance(size, int) and size > 0:
            self.block_size = size


class KvFollowers:
    """The replicas this event loop follows (its GatewayState's)."""

    def __init__(self, state: GatewayState) -> None:
        self.state = state
        self.replicas: dict[int, HeldBlocks] = {}
        # model id → its tokenizer (vLLM's reading), once fetched and read
        self.readers: dict[str, ModelTokenizer] = {}
        self._reading: dict[str, asyncio.Future[None]] = {}
        self._unreadable: dict[str, float] = {}  # model id → when reading it last failed

    def held(self, placement: Placement, model_id: str) -> HeldBlocks | None:
        """The replica's blocks, if its feed is live; following starts on first ask."""
        held = self.replicas.get(placement.pk)
        if held is None:
            held = self.replicas[placement.pk] = HeldBlocks(placement=placement)
            held.task = asyncio.ensure_future(self._follow(placement.pk, model_id, held))
        held.asked, held.placement = time.monotonic(), placement
        return held if held.live else None

    def match(
        self, prompt: PromptBlocks, placements: Sequence[Placement]
    ) -> tuple[dict[str, int], str | None] | None:
        """How many of the prompt's leading blocks each replica holds (keyed by placement
        pk as text, those with none left out), and the prompt's home (its first block, for
        the rendezvous that sends a new prefix to the same replica from every web process);
        None when no replica's blocks can be read (routing falls back to the index)."""
        if prompt.api is Api.EMBEDDINGS:  # no KV cache: nothing to follow
            return None
        matched: dict[str, int] = {}
        home: str | None = None
        followed = False
        for placement in placements:
            held = self.held(placement, prompt.target)
            if held is None:
                continue
            reader = None
            if held.tokens == "model" and held.placement is not None:
                reader = self.reader(prompt.target, held.placement)
            names = prompt.names(held.tokens, held.block_size, reader)
            if names is None:
                continue
            followed = True
            if names and home is None:
                home = f"{names[0]:016x}"
            depth = 0
            for name in names:
                if name not in held.names:
                    break
                depth += 1
            if depth:
                matched[str(placement.pk)] = depth
        return (matched, home) if followed else None

    def reader(self, model_id: str, placement: Placement) -> ModelTokenizer | None:
        """The model's tokenizer, if read; else its reading starts (from `placement`'s agent),
        unless it failed less than _TOKENIZER_RETRY_SECONDS ago."""
        found = self.readers.get(model_id)
        if found is not None or model_id in self._reading:
            return found
        if time.monotonic() - self._unreadable.get(model_id, -1e9) < _TOKENIZER_RETRY_SECONDS:
            return None
        task = asyncio.ensure_future(self._read_tokenizer(model_id, placement))
        self._reading[model_id] = task
        task.add_done_callback(lambda _: self._reading.pop(model_id, None))
        return None

    async def _read_tokenizer(self, model_id: str, placement: Placement) -> None:
        headers = {"Authorization": f"Bearer {placement.agent.credential}"}
        timeout = aiohttp.ClientTimeout(total=120, sock_connect=5)
        files: dict[str, bytes] = {}
        try:
            for name in TOKENIZER_FILES:
                url = f"{placement.inference_endpoint_url}/tokenizer/{name}"
                async with self.state.session.get(
                    url, headers=headers, timeout=timeout, allow_redirects=False
                ) as answer:
                    if answer.status == 404:
                        continue
                    if answer.status != 200:
                        raise ValueError(f"{name}: HTTP {answer.status}")
                    if (answer.content_length or 0) > _TOKENIZER_FILE_LIMIT:
                        raise ValueError(f"{name}: {answer.content_length} bytes")
                    files[name] = await answer.content.read(_TOKENIZER_FILE_LIMIT + 1)
                    if len(files[name]) > _TOKENIZER_FILE_LIMIT:
                        raise ValueError(f"{name}: over {_TOKENIZER_FILE_LIMIT} bytes")
            self.readers[model_id] = await asyncio.to_thread(ModelTokenizer.load, files)
            log.info("%s: its tokenizer read (precise routing)", model_id)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            self._unreadable[model_id] = time.monotonic()
            log.warning("%s: its tokenizer could not be read from %s: %s", model_id,
                        placement.agent.agent_id, exc)  # fmt: skip

    async def close(self) -> None:
        """Stop following, and wait for every feed's task to end: the state closes the session
        they read from next, under them otherwise."""
        tasks = [
            *(held.task for held in self.replicas.values() if held.task is not None),
            *self._reading.values(),
        ]
        for task in tasks:
            task.cancel()
        self.replicas.clear()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _follow(self, pk: int, model_id: str, held: HeldBlocks) -> None:
        """Read the replica's feed while anyone asks about it; again after a failure, later
        each time."""
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=_SILENT_SECONDS)
        pause = _RETRY_FIRST_SECONDS
        labels = ("", "")
        try:
            while time.monotonic() - held.asked < FOLLOW_IDLE_SECONDS:
                placement = held.placement
                assert placement is not None
                url = f"{placement.inference_endpoint_url}/kv"
                headers = {"Authorization": f"Bearer {placement.agent.credential}"}
                labels = (model_id, placement.agent.agent_id)
                gauge = metrics.KV_BLOCKS.labels(*labels)
                try:
                    async with self.state.session.get(
                        url, headers=headers, timeout=timeout, allow_redirects=False
                    ) as answer:
                        if answer.status != 200:
                            raise ValueError(f"HTTP {answer.status}")
                        async for raw in answer.content:
                            if time.monotonic() - held.asked >= FOLLOW_IDLE_SECONDS:
                                return  # nobody asks about it: a keep-alive ends it too
                            if not raw.strip():
                                continue  # the agent's keep-alive
                            line = json.loads(raw)
                            if not isinstance(line, dict):
                                raise ValueError("a line that is not an object")
                            if "tokens" in line:  # the first: the whole set
                                held.names.clear()
                                held.tokens = str(line["tokens"])
                                held.live, pause = True, _RETRY_FIRST_SECONDS
                                if held.tokens == "model":  # read before a request needs it
                                    self.reader(model_id, placement)
                            held.apply(line)
                            gauge.set(len(held.names))
                except (aiohttp.ClientError, TimeoutError, ValueError, TypeError) as exc:
                    log.info("replica %s: KV feed %s: %s", pk, url, exc)
                held.live = False
                held.names.clear()
                _forget(labels)
                await asyncio.sleep(pause)
                pause = min(pause * 2, _RETRY_MAX_SECONDS)
        finally:
            held.live = False
            _forget(labels)
            if self.replicas.get(pk) is held:
                del self.replicas[pk]


def _forget(labels: tuple[str, str]) -> None:
    with contextlib.suppress(KeyError):
        metrics.KV_BLOCKS.remove(*labels)
