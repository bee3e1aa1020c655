"""Precise routing's side in the gateway (controlplane.gateway.kvfollow): a request's blocks
named as the agent names the engine's, bounded per request; each replica's feed followed,
and one that answers garbage or goes away never trusted."""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agents.models import Agent, Placement
from controlplane.gateway.apis import Api
from controlplane.gateway.kvfollow import HeldBlocks, KvFollowers, PromptBlocks
from nodeagent.engines.simcache import PrefixCache
from nodeagent.kvblocks import sim_prompt, word_ids
from nodeagent.kvevents import EngineBlocks, Stored
from tests.support import until

CHAT = {"model": "org/tiny", "messages": [
    {"role": "system", "content": " ".join(f"rule-{n}" for n in range(100))},
    {"role": "user", "content": "what now?"},
]}  # fmt: skip


class Recorder:
    """The sim's PrefixCache publishing into an agent's EngineBlocks, in one process."""

    def __init__(self, served: str) -> None:
        self.blocks = EngineBlocks(served)

    def stored(self, keys: Any, parent: Any, tokens: Any, size: int, lora: Any) -> None:
        self.blocks.apply(Stored(list(keys), parent, list(tokens), size, lora))

    def removed(self, keys: Any) -> None:
        raise AssertionError("nothing is evicted here")


def test_a_prompts_blocks_are_named_as_the_agent_names_what_the_engine_stored():
    recorder = Recorder("org/tiny")
    cache = PrefixCache(16, 1000, recorder)
    cache.serve(word_ids(sim_prompt(CHAT, chat=True)), "org/tiny")
    prompt = PromptBlocks(Api.CHAT, CHAT, "org/tiny", "org/tiny", 64 * 1024)
    names = prompt.names("words", 16)
    assert names is not None
    assert len(names) == 101 // 16
    assert set(names) == set(recorder.blocks.held)


def test_an_adapters_blocks_are_its_own():
    base = PromptBlocks(Api.CHAT, CHAT, "org/tiny", "org/tiny", 65536).names("words", 16)
    adapter = PromptBlocks(Api.CHAT, CHAT, "org/tiny-sql", "org/tiny", 65536).names("words", 16)
    assert base
    assert adapter
    assert not set(base) & set(adapter)


@pytest.mark.parametrize(
    "body",
    [
        {"model": "m", "prompt": "word " * 1_000_000},  # 5 MB: read up to the cap only
        {"model": "m", "prompt": "\ud800 \U0001f600 e\u0301 " * 1000},  # odd unicode
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64," + "A" * 10**6},
                        },
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ],
            "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
        },
        {"model": "m", "messages": "not a list"},
        {"model": "m", "messages": [1, None, {"content": None}]},
        {"model": "m", "prompt": [1, 2, 3]},
    ],
)
def test_any_prompt_is_read_within_the_cap_and_never_fails(body):
    api = Api.CHAT if "messages" in body else Api.COMPLETIONS
    names = PromptBlocks(api, body, "m", "m", 64 * 1024).names("words", 16)
    assert names is not None
    assert len(names) <= 64 * 1024 // 2 // 16 + 1


def test_readings_it_lacks_and_embeddings_have_no_blocks():
    assert PromptBlocks(Api.CHAT, CHAT, "m", "m", 65536).names("model", 16) is None
    assert PromptBlocks(Api.EMBEDDINGS, {"input": "x"}, "m", "m", 65536).names("words", 16) is None


def followers_holding(*held: HeldBlocks | None) -> tuple[KvFollowers, list[Placement]]:
    """Followers whose feeds are as given (None: not live), without connections."""
    followers = KvFollowers(SimpleNamespace())  # type: ignore[arg-type]
    placements = []
    for number, blocks in enumerate(held, start=1):
        placements.append(Placement(pk=number))
        followers.replicas[number] = blocks or HeldBlocks()
    return followers, placements


def test_a_replica_matches_by_the_leading_blocks_it_holds():
    prompt = PromptBlocks(Api.CHAT, CHAT, "org/tiny", "org/tiny", 65536)
    names = prompt.names("words", 16)
    assert names is not None
    some = HeldBlocks("words", 16, set(names[:3]), live=True)
    gap = HeldBlocks("words", 16, set(names[1:]), live=True)  # not its first: no match
    followers, placements = followers_holding(some, gap, None)
    found = followers.match(prompt, placements)
    assert found == ({"1": 3}, f"{names[0]:016x}")


def test_with_no_live_feed_routing_falls_back():
    prompt = PromptBlocks(Api.CHAT, CHAT, "org/tiny", "org/tiny", 65536)
    followers, placements = followers_holding(None, HeldBlocks("model", 16, set(), live=True))
    followers._unreadable["org/tiny"] = time.monotonic()  # its tokenizer could not be read
    assert followers.match(prompt, placements) is None


def test_a_feed_is_applied_line_by_line():
    held = HeldBlocks()
    held.apply({"tokens": "words", "block_size": 16, "add": [1, 2, 3]})
    held.apply({"block_size": 16, "remove": [2]})
    assert held.names == {1, 3}
    held.apply({"clear": True})
    held.apply({"add": [4]})
    assert held.names == {4}
    assert held.block_size == 16


@pytest.mark.parametrize(
    "answer",
    [
        b"not json\n",
        b"[1, 2]\n",
        b'{"tokens": "words", "block_size": 16, "add": 7}\n',
        b'{"tokens": "words", "block_size": 16, "add": [1]}\n{"remove": {"x": 1}}\n',
    ],
)
def test_an_agent_that_answers_garbage_is_never_trusted(answer):
    """A peer's garbage ends its feed (logged), the replica unmatched until it answers well;
    the follower keeps trying, and nothing is raised into routing."""

    async def scenario() -> tuple[int, bool]:
        served = 0

        async def kv(request: web.Request) -> web.StreamResponse:
            nonlocal served
            served += 1
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(answer)
            return response

        app = web.Application()
        app.router.add_get("/models/m/kv", kv)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as session:
            followers = KvFollowers(SimpleNamespace(session=session))  # type: ignore[arg-type]
            placement = Placement(pk=1, inference_endpoint_url=f"http://127.0.0.1:{port}/models/m")
            placement.agent = Agent(agent_id="a")
            assert followers.held(placement, "m") is None
            await until(lambda: served >= 2, 10, "a second try")
            live = followers.replicas[1].live and bool(followers.replicas[1].names)
            task = followers.replicas[1].task
            await followers.close()
            assert task is not None
            assert task.done()  # ended before the session closes
        await runner.cleanup()
        return served, live

    served, live = asyncio.run(scenario())
    assert served >= 2
    assert not live
