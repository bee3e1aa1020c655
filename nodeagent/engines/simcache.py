"""The simulated engine's KV cache: vLLM's automatic prefix caching, modelled.

What a prompt's prefix-cache hits are (its leading full blocks found) decides the
sim's prefill time and the hit rate its /metrics report; with a publisher, what it
stores and evicts goes out as vLLM's KV events do (nodeagent.kvevents), so the
gateway's cache-aware routing can be tested without a GPU.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from nodeagent.kvevents import KvEventPublisher

_KEY_MASK = 2**64 - 1


class PrefixCache:
    """vLLM's automatic prefix caching, modelled: a prompt's full blocks of `block_tokens`
    tokens, each keyed by its tokens and every block before it (and the served model, so that
    an adapter's KV is its own), kept least recently used first out past `capacity` blocks. A
    prompt's hits are its leading blocks found, as vLLM's are. With a `publisher`, it tells
    what it stores and evicts as vLLM's KV events do (`nodeagent.kvevents`), under keys of
    its own, as vLLM's are."""

    def __init__(
        self, block_tokens: int, capacity: int, publisher: KvEventPublisher | None = None
    ) -> None:
        self.block_tokens = block_tokens
        self.capacity = capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()
        self.publisher = publisher

    def serve(self, tokens: Sequence[int], served: str, adapter: str | None = None) -> int:
        """The prompt's tokens found cached; its blocks are cached now, the most recent, its
        first block most recent of all: as vLLM frees a request's blocks tail first, a
        prompt's end is evicted before its start (which every later turn needs). `served`:
        the model or adapter named by the request; `adapter` the same for an adapter."""
        if not self.capacity:
            return 0
        size, blocks = self.block_tokens, self.blocks
        # Its keys are its own, as vLLM's are, and unsigned, as vLLM's are on the wire.
        link, chain = hash(served) & _KEY_MASK, []
        for start in range(0, len(tokens) - size + 1, size):
            link = hash((link, tuple(tokens[start : start + size]))) & _KEY_MASK
            chain.append(link)
        hits = 0
        for link in chain:
            if link not in blocks:
                break
            hits += size
        stored: list[tuple[int | None, list[int], int]] = []  # (parent, keys, first block)
        for index, link in enumerate(chain):
            if link in blocks:
                continue
            if stored and stored[-1][2] + len(stored[-1][1]) == index:
                stored[-1][1].append(link)
            else:
                stored.append((chain[index - 1] if index else None, [link], index))
        for link in reversed(chain):
            blocks[link] = None
            blocks.move_to_end(link)
        evicted = []
        while len(blocks) > self.capacity:
            evicted.append(blocks.popitem(last=False)[0])
        if self.publisher is not None:
            for parent, keys, first in stored:
                ids = tokens[first * size : (first + len(keys)) * size]
                self.publisher.stored(keys, parent, ids, size, adapter)
            if evicted:
                self.publisher.removed(evicted)
        return hits
