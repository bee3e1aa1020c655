"""The agent's reading of engines' KV events (nodeagent.kvevents): vLLM's wire format, the
blocks renamed as the gateway names them, and every event it cannot use dropped and counted,
never raised."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter

import msgspec
import pytest

from nodeagent.engines.simcache import PrefixCache
from nodeagent.kvblocks import block_chain, chain_root, word_ids
from nodeagent.kvevents import (
    NAMES_PER_LINE,
    BadEvent,
    Change,
    Cleared,
    EngineBlocks,
    KvEventPublisher,
    KvFeed,
    Removed,
    Stored,
    kv_head,
    kv_lines,
    parse_batch,
)
from tests.support import until


def vllm_message(seq: int, *events: dict | list) -> list[bytes]:
    """A message as vLLM 0.32's ZmqEventPublisher sends it: (topic, seq, msgpack batch), the
    events as maps tagged by `type` (KVCacheEvent is tag=True, not array_like)."""
    return [b"", seq.to_bytes(8, "big"), msgspec.msgpack.encode([time.time(), list(events), 0])]


def stored(keys: list, parent, tokens: list[int], size: int = 4, **more) -> dict:
    return {"type": "BlockStored", "block_hashes": keys, "parent_block_hash": parent,
            "token_ids": tokens, "block_size": size, "lora_id": None, "medium": "GPU",
            "lora_name": None, **more}  # fmt: skip


class Feed:
    """A KvFeed's parsing and state without its socket's task."""

    def __init__(self, served: str = "org/tiny") -> None:
        self.dropped: Counter[str] = Counter()
        self.feed = KvFeed(served, lambda reason: self.dropped.update([reason]))
        self.block_size, names, self.follower = self.feed.follow()
        assert names == []

    def changes(self) -> list[Change]:
        out = []
        while not self.follower.changes.empty():
            change = self.follower.changes.get_nowait()
            assert change is not None
            out.append(change)
        return out


@pytest.fixture
def feed():
    made = Feed()
    yield made
    asyncio.run(made.feed.close())


def test_blocks_are_named_as_the_gateway_names_them(feed):
    tokens = list(range(12))
    feed.feed.take(vllm_message(0, stored([b"k1", b"k2"], None, tokens[:8])))
    feed.feed.take(vllm_message(1, stored([b"k3"], b"k2", tokens[8:12])))
    expected = block_chain(tokens, 4, chain_root("org/tiny"))
    assert sorted(feed.feed.blocks.held) == sorted(expected)
    assert [c.added for c in feed.changes()] == [tuple(expected[:2]), (expected[2],)]
    assert feed.feed.blocks.block_size == 4

    feed.feed.take(vllm_message(2, {"type": "BlockRemoved", "block_hashes": [b"k3", b"nope"],
                                    "medium": "GPU"}))  # fmt: skip
    assert feed.changes() == [Change(removed=(expected[2],))]
    feed.feed.take(vllm_message(3, {"type": "AllBlocksCleared"}))
    assert feed.changes() == [Change(cleared=True)]
    assert not feed.feed.blocks.held
    assert not feed.dropped


def test_an_adapters_blocks_chain_from_its_own_name(feed):
    feed.feed.take(vllm_message(0, stored([7], None, [1, 2, 3, 4], lora_id=1,
                                          lora_name="org/tiny-sql",
                                          extra_keys=[["org/tiny-sql"]])))  # fmt: skip
    assert list(feed.feed.blocks.held) == block_chain([1, 2, 3, 4], 4, chain_root("org/tiny-sql"))
    assert not feed.dropped


def test_a_block_stored_twice_stays_until_both_are_removed(feed):
    # Two engine blocks with the same tokens (vLLM may keep duplicates): one name, held twice.
    feed.feed.take(
        vllm_message(0, stored([1], None, [5, 5, 5, 5]), stored([2], None, [5, 5, 5, 5]))
    )
    (name,) = feed.feed.blocks.held
    feed.feed.take(vllm_message(1, {"type": "BlockRemoved", "block_hashes": [1]}))
    assert name in feed.feed.blocks.held
    feed.feed.take(vllm_message(2, {"type": "BlockRemoved", "block_hashes": [2]}))
    assert name not in feed.feed.blocks.held


@pytest.mark.parametrize(
    ("frames", "reason"),
    [
        ([b"", b"\x00" * 8], "malformed"),  # two frames
        ([b"", b"\x00" * 8, b"\xc1garbage"], "malformed"),  # not msgpack
        ([b"", b"\x00" * 8, msgspec.msgpack.encode({"ts": 1})], "malformed"),  # not a batch
    ],
)
def test_a_message_it_cannot_read_is_dropped_and_counted(feed, frames, reason):
    feed.feed.take(frames)
    assert feed.dropped == Counter([reason])


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        ({"type": "BlockStored", "block_hashes": [1]}, "malformed"),  # no tokens
        (stored([1], None, [1, 2, 3]), "malformed"),  # tokens are not its blocks'
        (stored([1], None, [1, 2, 3, -4]), "malformed"),  # a negative token id
        (stored([1], None, [1, 2, 3, 2**40]), "malformed"),  # a token id past 32 bits
        (stored([1.5], None, [1, 2, 3, 4]), "malformed"),  # a float for a hash
        (stored([1], 99, [1, 2, 3, 4]), "unknown_parent"),  # out of order, or lost
        (stored([1], None, [1, 2, 3, 4], lora_id=3), "unnamed_adapter"),
        (stored([1], None, [1, 2, 3, 4], extra_keys=[[("mm", "abc", 0)]]), "extra_keys"),
        (stored([1], None, [1, 2, 3, 4], medium="CPU"), "other_medium"),
        ({"type": "Something"}, "malformed"),
        ({"type": "Something", "block_hashes": []}, "unknown_type"),
        ("BlockStored", "malformed"),
        (["BlockStored", [1], None, [1, 2, 3]], "malformed"),
    ],
)
def test_an_event_it_cannot_use_is_dropped_and_the_rest_applied(feed, event, reason):
    feed.feed.take(vllm_message(0, event, stored([b"ok"], None, [9, 9, 9, 9])))
    assert feed.dropped == Counter([reason])
    assert len(feed.feed.blocks.held) == 1  # the good event after it counts


def test_array_events_of_older_vllm_are_read():
    (event,) = parse_batch(msgspec.msgpack.encode([0.0, [["BlockStored", [1], None, [1, 2], 2,
                                                          None, "GPU"]]]))  # fmt: skip
    assert event == Stored([1], None, [1, 2], 2, None)
    (event,) = parse_batch(msgspec.msgpack.encode([0.0, [["BlockRemoved", [1], "GPU"]]]))
    assert event == Removed([1])


def test_lost_events_empty_the_set(feed):
    feed.feed.take(vllm_message(0, stored([1], None, [1, 2, 3, 4])))
    feed.feed.take(vllm_message(5, stored([2], None, [5, 6, 7, 8])))  # 1..4 lost
    assert feed.dropped == Counter(["gap"])
    assert feed.feed.blocks.held == Counter(block_chain([5, 6, 7, 8], 4, chain_root("org/tiny")))
    assert Change(cleared=True) in feed.changes()


def test_a_slow_follower_is_cut_off_not_buffered_for_ever(feed, monkeypatch):
    monkeypatch.setattr("nodeagent.kvevents.FOLLOWER_BACKLOG", 3)
    for seq in range(5):
        feed.feed.take(vllm_message(seq, stored([seq], None, [seq] * 4)))
    assert feed.follower.cut
    queued = [feed.follower.changes.get_nowait() for _ in range(feed.follower.changes.qsize())]
    assert queued[-1] is None
    assert len(queued) == 4


def test_lines_stay_short_however_many_blocks():
    names = list(range(NAMES_PER_LINE * 2 + 1))
    lines = kv_head("org/tiny", "sim", 16, names)
    parsed = [json.loads(line) for line in lines]
    assert parsed[0]["tokens"] == "words"
    assert parsed[0]["block_size"] == 16
    assert sum(len(line.get("add", ())) for line in parsed) == len(names)
    assert all(len(line) < 64 * 1024 for line in lines)
    assert kv_lines(Change(cleared=True), 16) == [b'{"clear":true}\n']
    assert json.loads(kv_lines(Change(removed=(3,)), 16)[0]) == {"block_size": 16, "remove": [3]}


def test_the_sim_engine_publishes_what_its_cache_stores_and_evicts():
    """Over a real ZMQ socket, as vLLM's: the agent's set is the sim cache's, evictions too."""

    async def scenario() -> tuple[set[int], set[int], Counter[str]]:
        dropped: Counter[str] = Counter()
        feed = KvFeed("m", lambda reason: dropped.update([reason]))
        publisher = KvEventPublisher(feed.endpoint)
        feed.start()
        try:
            await connected(publisher, feed)
            cache = PrefixCache(4, 5, publisher)
            first = word_ids("a b c d e f g h i j k l m")
            cache.serve(first, "m")
            second = word_ids("z y x w v u t s r q p o")
            cache.serve(second, "m")  # 3 more blocks: 5 kept, the oldest of the first out
            await until(lambda: len(feed.blocks.held) == 5, 10, "the evictions told")
            expected = set(block_chain(second, 4, chain_root("m")))
            expected |= set(block_chain(first, 4, chain_root("m")))
            return set(feed.blocks.held), expected, dropped
        finally:
            publisher.close()
            await feed.close()

    held, expected, dropped = asyncio.run(scenario())
    assert len(held) == 5
    assert held < expected
    assert not dropped


async def connected(publisher: KvEventPublisher, feed: KvFeed) -> None:
    """Once the publisher's connection stands (ZMQ drops what a PUB socket sends before):
    a probe block sent until it arrives, then cleared."""
    async with asyncio.timeout(10):
        while not feed.blocks.held:
            publisher.stored([0], None, [0, 0, 0, 0], 4, None)
            await asyncio.sleep(0.01)
        publisher.cleared()
    await until(lambda: not feed.blocks.held, 10, "the probe cleared")


def test_bad_event_reasons_are_labels():
    with pytest.raises(BadEvent) as caught:
        EngineBlocks("m").apply(Stored([1], 2, [1], 1, None))
    assert caught.value.reason == "unknown_parent"
    assert EngineBlocks("m").apply(Cleared()) is None  # nothing held: nothing to tell


def test_a_closed_feed_ends_its_followers_and_any_that_come_late():
    async def scenario() -> tuple[Change | None, Change | None]:
        feed = KvFeed("m", lambda reason: None)
        _, _, early = feed.follow()
        await feed.close()
        await feed.close()  # twice is harmless
        _, names, late = feed.follow()
        assert names == []
        return await early.changes.get(), await late.changes.get()

    assert asyncio.run(scenario()) == (None, None)
