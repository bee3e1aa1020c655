"""The `sim` engine: a simulated OpenAI-compatible engine, for fleet-scale tests without GPUs.

In the spirit of llm-d's inference simulator: it takes a configurable time to
load, to produce the first token and each next one; its text is deterministic
(the same prompt gives the same words); it streams SSE like vLLM (the Responses
API's typed events included), reports `usage`, serves embeddings when started
as a pooling runner (`--runner pooling`, as vLLM does), exposes vLLM-named
`/metrics`, loads LoRA adapters at run time when started with LoRA (vLLM's
`/v1/load_lora_adapter`; an adapter's answer is its own deterministic text), and
implements vLLM's sleep endpoints
(`/sleep?level=1`, `/wake_up`, `/is_sleeping`) so the DRAM tier is exercised
without a GPU. It runs inside the agent's event loop on a 127.0.0.1 port, so
many sim agents fit on a small machine; `python -m nodeagent.engines.sim`
runs one alone.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import math
import random
import struct
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from nodeagent.config import SimSettings
from nodeagent.engines.base import EngineError, EngineExit, wait_until_ready
from nodeagent.kvblocks import sim_prompt, sim_responses_text, word_ids
from nodeagent.kvevents import KvEventPublisher, KvFeed

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
_JSON = "application/json"


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


def _input_texts(value: Any) -> list[str] | None:
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


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return web.json_response(body, status=status)


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


@dataclass
class _Counters:
    running: int = 0
    waiting: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    generation_tokens: int = 0


def _response_object(model_id: str, body: dict[str, Any], usage: dict[str, int]) -> dict[str, Any]:
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


def _finished(response: dict[str, Any], text: str, usage: dict[str, int]) -> dict[str, Any]:
    message = {
        "id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant",
        "status": "completed",
        "content": [{"type": "output_text", "text": text, "annotations": []}],
    }  # fmt: skip
    return {**response, "status": "completed", "output": [message], "usage": usage}


class _Seat:
    """One of the engine's max_num_seqs, counted as waiting until it is free."""

    def __init__(self, server: SimServer) -> None:
        self.server = server

    async def __aenter__(self) -> None:
        counters = self.server.counters
        counters.waiting += 1
        try:
            await self.server.seats.acquire()
        finally:
            counters.waiting -= 1
        counters.running += 1

    async def __aexit__(self, *exc: object) -> None:
        self.server.counters.running -= 1
        self.server.seats.release()


class SimServer:
    """The simulated engine's HTTP API for one served model."""

    def __init__(
        self, model_id: str, settings: SimSettings, pooling: bool = False, max_lora_rank: int = 0,
        kv_events: str | None = None, enable_scale_out: bool = False,
    ) -> None:  # fmt: skip
        self.model_id = model_id
        self.settings = settings
        # vLLM's --enable-scale-out: its render endpoints answer (else 403, as vLLM's do)
        self.enable_scale_out = enable_scale_out
        self.pooling = pooling  # an embedding model's engine: embeddings only, as vLLM's
        self.max_lora_rank = max_lora_rank  # 0: started without LoRA
        self.loras: dict[str, str] = {}  # adapter name → its directory
        self.lora_loads = 0
        self.sleeping = False
        # vLLM once its EngineCore (or a worker) died: requests get 500 EngineDeadError and
        # /health 503, while the API server still runs (`kill_core`).
        self.core_dead = False
        self.counters = _Counters()
        self.seats = asyncio.Semaphore(settings.max_num_seqs)
        # Its KV events, as vLLM's --kv-events-config publishes them, to `kv_events`.
        self.kv_events = KvEventPublisher(kv_events) if kv_events else None
        self.prefix_cache = PrefixCache(settings.block_tokens, settings.cache_blocks,
                                        self.kv_events)  # fmt: skip
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/v1/models", self.models),
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/completions", self.completions),
                web.post("/v1/responses", self.responses),
                web.post("/v1/embeddings", self.embeddings),
                web.post("/v1/chat/completions/render", self.render_chat),
                web.post("/v1/completions/render", self.render_completion),
                web.get("/metrics", self.metrics),
                web.post("/sleep", self.sleep),
                web.post("/wake_up", self.wake_up),
                web.get("/is_sleeping", self.is_sleeping),
            ]
        )
        if self.max_lora_rank:  # vLLM mounts these with --enable-lora and runtime updating
            app.add_routes(
                [
                    web.post("/v1/load_lora_adapter", self.load_lora_adapter),
                    web.post("/v1/unload_lora_adapter", self.unload_lora_adapter),
                ]
            )
        return app

    async def load_lora_adapter(self, request: web.Request) -> web.Response:
        body = await request.json()
        name, path = body.get("lora_name"), body.get("lora_path")
        if not isinstance(name, str) or not isinstance(path, str):
            return _error(400, "lora_name and lora_path are required")
        if name in self.loras:
            return _error(400, f"The lora adapter '{name}' has already been loaded.")
        try:
            config = json.loads((Path(path) / "adapter_config.json").read_text())
        except (OSError, ValueError) as exc:
            return _error(400, f"Loading lora {name} failed: {exc}")
        rank = config.get("r") if isinstance(config, dict) else None
        if not isinstance(rank, int) or rank > self.max_lora_rank:
            return _error(400, f"LoRA rank {rank} is greater than max_lora_rank "
                               f"{self.max_lora_rank}.")  # fmt: skip
        self.loras[name] = path
        self.lora_loads += 1
        return web.Response(text=f"Success: LoRA adapter '{name}' added successfully.")

    async def unload_lora_adapter(self, request: web.Request) -> web.Response:
        name = (await request.json()).get("lora_name")
        if name not in self.loras:
            return _error(404, f"The lora adapter '{name}' cannot be found.")
        del self.loras[name]
        return web.Response(text=f"Success: LoRA adapter '{name}' removed successfully.")

    def _seed(self, body: dict[str, Any], prompt: str) -> str:
        """What chooses the answer's words: an adapter answers differently from its base."""
        model = body.get("model")
        return f"{model}\n{prompt}" if model in self.loras else prompt

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=503 if self.core_dead else 200)

    async def models(self, request: web.Request) -> web.Response:
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "llmfleet-sim",
        }
        loras = [
            {**entry, "id": name, "root": path, "parent": self.model_id}
            for name, path in self.loras.items()
        ]
        return web.json_response({"object": "list", "data": [entry, *loras]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _body(self, request: web.Request, pooling: bool) -> dict[str, Any] | web.Response:
        """The request's JSON for this engine, or the error vLLM would answer."""
        if self.pooling != pooling:  # vLLM mounts only its runner's routes
            return web.json_response({"detail": "Not Found"}, status=404)
        if self.core_dead:
            return _error(500, "EngineCore encountered an issue. See stack trace for details.")
        if self.sleeping:
            return _error(503, "the engine is sleeping")
        try:
            body = await request.json()
        except ValueError as exc:
            return _error(400, f"malformed JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        if body.get("model") != self.model_id and body.get("model") not in self.loras:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        return body

    async def render_chat(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=True)

    async def render_completion(self, request: web.Request) -> web.Response:
        return await self._render(request, chat=False)

    async def _render(self, request: web.Request, chat: bool) -> web.Response:
        """vLLM's render endpoints: the prompt's token ids, as the engine will read them (a
        router that matches KV events by tokens asks, as vllm-router's kv_aware does). Off
        unless started with --enable-scale-out, as vLLM's."""
        if not self.enable_scale_out:
            message = ("Scale-out endpoints are disabled. Restart vllm serve with "
                       "--enable-scale-out to enable them.")  # fmt: skip
            refusal = {"error": {"message": message, "type": "PermissionDeniedError",
                                 "param": None, "code": 403}}  # fmt: skip
            return web.json_response(refusal, status=403)
        body = await self._body(request, pooling=False)
        if isinstance(body, web.Response):
            return body
        rendered = {"token_ids": word_ids(sim_prompt(body, chat))}
        return web.json_response(rendered if chat else [rendered])  # completions: one a prompt

    async def embeddings(self, request: web.Request) -> web.Response:
        body = await self._body(request, pooling=True)
        if isinstance(body, web.Response):
            return body
        texts = _input_texts(body.get("input"))
        if texts is None:
            return _error(400, "input must be a string, strings or token ids")
        dimensions = body.get("dimensions") or EMBEDDING_DIMENSIONS
        if not isinstance(dimensions, int) or not 1 <= dimensions <= 4096:
            return _error(400, "dimensions must be between 1 and 4096")
        await asyncio.sleep(self.settings.ttft_ms / 1000)
        data = []
        for index, text in enumerate(texts):
            vector: Any = embedding_for(text, dimensions)
            if body.get("encoding_format") == "base64":
                vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
            data.append({"index": index, "object": "embedding", "embedding": vector})
        tokens = sum(len(text.split()) or 1 for text in texts)
        return web.json_response({
            "id": f"embd-{uuid.uuid4().hex}", "object": "list", "created": int(time.time()),
            "model": self.model_id, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        })  # fmt: skip

    async def responses(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request, pooling=False)
        if isinstance(body, web.Response):
            return body
        max_tokens = body.get("max_output_tokens") or 16
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_output_tokens must be a positive integer")
        prompt = sim_responses_text(body)
        tokens = words_for(self._seed(body, prompt), max_tokens)
        usage = {
            "input_tokens": len(prompt.split()),
            "output_tokens": len(tokens),
            "total_tokens": len(prompt.split()) + len(tokens),
        }
        async with self._seat():
            response = _response_object(body["model"], body, usage)
            if not body.get("stream"):
                await asyncio.sleep(self._seconds_for(len(tokens)))
                self.counters.generation_tokens += len(tokens)
                return web.json_response(_finished(response, " ".join(tokens), usage))
            stream = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await stream.prepare(request)
            async for event in self._response_events(response, tokens, usage):
                line = f"event: {event['type']}\ndata: {json.dumps(event)}\n\n"
                await stream.write(line.encode())
            await stream.write_eof()
            return stream

    async def _response_events(
        self, response: dict[str, Any], tokens: list[str], usage: dict[str, int]
    ) -> AsyncIterator[dict[str, Any]]:
        """The Responses API's events for one text answer, in vLLM's order."""
        item = {"id": f"msg_{uuid.uuid4().hex}", "type": "message", "role": "assistant"}
        where = {"item_id": item["id"], "output_index": 0, "content_index": 0}
        events: list[dict[str, Any]] = [
            {"type": "response.created", "response": response},
            {"type": "response.in_progress", "response": response},
            {"type": "response.output_item.added", "output_index": 0,
             "item": {**item, "status": "in_progress", "content": []}},
            {"type": "response.content_part.added", **where,
             "part": {"type": "output_text", "text": "", "annotations": []}},
        ]  # fmt: skip
        sequence = 0
        for event in events:
            yield {**event, "sequence_number": sequence}
            sequence += 1
        await asyncio.sleep(self.settings.ttft_ms / 1000)
        for position, token in enumerate(tokens):
            if position:
                await asyncio.sleep(self.settings.tpot_ms / 1000)
            delta = token if position == 0 else f" {token}"
            self.counters.generation_tokens += 1
            yield {"type": "response.output_text.delta", **where, "delta": delta,
                   "logprobs": [], "sequence_number": sequence}  # fmt: skip
            sequence += 1
        text = " ".join(tokens)
        part = {"type": "output_text", "text": text, "annotations": []}
        done = {**item, "status": "completed", "content": [part]}
        for event in (
            {"type": "response.output_text.done", **where, "text": text, "logprobs": []},
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": 0, "item": done},
            {"type": "response.completed", "response": _finished(response, text, usage)},
        ):
            yield {**event, "sequence_number": sequence}
            sequence += 1

    def _seat(self) -> _Seat:
        return _Seat(self)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        body = await self._body(request, pooling=False)
        if isinstance(body, web.Response):
            return body
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_tokens must be a positive integer")
        prompt = sim_prompt(body, chat)
        prefill = self._count_prefix(prompt, str(body.get("model", "")))
        async with self._seat():
            self._log_request(body, prompt)
            await asyncio.sleep(prefill)
            tokens = words_for(self._seed(body, prompt), max_tokens)
            usage = {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(tokens),
                "total_tokens": len(prompt.split()) + len(tokens),
            }
            if body.get("stream"):
                return await self._stream(request, body, chat, tokens, usage)
            await asyncio.sleep(self._seconds_for(len(tokens)))
            self.counters.generation_tokens += len(tokens)
            return web.json_response(self._full(chat, " ".join(tokens), usage, body["model"]))

    def _log_request(self, body: dict[str, Any], prompt: str) -> None:
        """The request the engine took, to --sim-request-log (what "sent once" is checked
        against)."""
        if self.settings.request_log:
            with open(self.settings.request_log, "a") as log:
                log.write(json.dumps({"model": body.get("model"), "prompt": prompt}) + "\n")

    def _count_prefix(self, prompt: str, model: str) -> float:
        """The prompt through the prefix cache, counted as vLLM counts it (in tokens); the
        prefill time of the tokens it did not hold."""
        tokens = word_ids(prompt)
        hits = self.prefix_cache.serve(tokens, model, model if model in self.loras else None)
        self.counters.prefix_queries += len(tokens)
        self.counters.prefix_hits += hits
        return (len(tokens) - hits) * self.settings.prefill_ms_per_token / 1000

    def _seconds_for(self, tokens: int) -> float:
        return (self.settings.ttft_ms + self.settings.tpot_ms * max(tokens - 1, 0)) / 1000

    def _full(self, chat: bool, text: str, usage: dict[str, int], model: str) -> dict[str, Any]:
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

    async def _stream(
        self,
        request: web.Request,
        body: dict[str, Any],
        chat: bool,
        tokens: list[str],
        usage: dict[str, int],
    ) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )
        await response.prepare(request)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        chunks = self._chunks(chat, tokens, usage if include_usage else None, body["model"])
        async for chunk in chunks:
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _chunks(
        self, chat: bool, tokens: list[str], usage: dict[str, int] | None, model: str
    ) -> AsyncIterator[dict[str, Any]]:
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": model,
        }
        if chat:
            yield base | {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}
        await asyncio.sleep(self.settings.ttft_ms / 1000)
        for position, token in enumerate(tokens):
            if position:
                await asyncio.sleep(self.settings.tpot_ms / 1000)
            text = token if position == 0 else f" {token}"
            last = position == len(tokens) - 1
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                choice["delta"] = {"content": text}
            else:
                choice["text"] = text
            self.counters.generation_tokens += 1
            yield base | {"choices": [choice]}
        if usage is not None:
            yield base | {"choices": [], "usage": usage}

    async def metrics(self, request: web.Request) -> web.Response:
        c = self.counters
        label = f'{{model_name="{self.model_id}",engine="0"}}'
        lines = [
            "# TYPE vllm:num_requests_running gauge",
            f"vllm:num_requests_running{label} {c.running}",
            "# TYPE vllm:num_requests_waiting gauge",
            f"vllm:num_requests_waiting{label} {c.waiting}",
            "# TYPE vllm:kv_cache_usage_perc gauge",
            f"vllm:kv_cache_usage_perc{label} {c.running / self.settings.max_num_seqs}",
            "# TYPE vllm:prefix_cache_queries counter",
            f"vllm:prefix_cache_queries_total{label} {c.prefix_queries}",
            "# TYPE vllm:prefix_cache_hits counter",
            f"vllm:prefix_cache_hits_total{label} {c.prefix_hits}",
            "# TYPE vllm:generation_tokens counter",
            f"vllm:generation_tokens_total{label} {c.generation_tokens}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def sleep(self, request: web.Request) -> web.Response:
        if request.query.get("level", "1") not in {"1", "2"}:
            return _error(400, "level must be 1 or 2")
        self.sleeping = True
        self.prefix_cache.blocks.clear()  # as vLLM's: its KV cache is dropped
        if self.kv_events is not None:
            self.kv_events.cleared()
        return web.Response(status=200)

    async def wake_up(self, request: web.Request) -> web.Response:
        if self.sleeping:
            await asyncio.sleep(self.settings.wake_seconds)
            self.sleeping = False
        return web.Response(status=200)

    async def is_sleeping(self, request: web.Request) -> web.Response:
        return web.json_response({"is_sleeping": self.sleeping})


class SimEngine:
    """A SimServer started inside the agent's event loop, behind the Engine interface."""

    name = "sim"
    supports_sleep = True

    def __init__(
        self, model_id: str, settings: SimSettings, pooling: bool = False, max_lora_rank: int = 0,
        kv_feed: KvFeed | None = None,
    ) -> None:  # fmt: skip
        self.model_id = model_id
        self.settings = settings
        self.max_num_seqs = settings.max_num_seqs
        self.kv_feed = kv_feed
        endpoint = kv_feed.endpoint if kv_feed is not None else None
        self.server = SimServer(model_id, settings, pooling, max_lora_rank, endpoint)
        self.url = ""
        self._runner: web.AppRunner | None = None
        self._exited: asyncio.Future[EngineExit] = asyncio.get_running_loop().create_future()

    async def start(self, session: aiohttp.ClientSession, deadline: float) -> None:
        # The simulated load: weights "move" to the GPU before the engine listens.
        remaining = deadline - asyncio.get_running_loop().time()
        if self.settings.load_seconds > remaining:
            await asyncio.sleep(max(remaining, 0))
            raise EngineError("load_timeout", "engine was not ready before the load deadline")
        await asyncio.sleep(self.settings.load_seconds)
        self._runner = web.AppRunner(self.server.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        try:
            await wait_until_ready(self, session, self.model_id, deadline, self._exited)
        except EngineError:
            await self.stop()
            raise

    async def stop(self) -> None:
        await asyncio.sleep(self.settings.stop_seconds)
        await self._release()
        if not self._exited.done():
            self._exited.set_result(EngineExit(expected=True, returncode=0, detail="stopped"))

    def kill_core(self) -> None:
        """As vLLM when its EngineCore or a worker is killed (an OOM kill, a GPU fault): the
        API server answers on, 500 to every request and 503 to /health. For tests."""
        self.server.core_dead = True

    async def crash(self) -> None:
        """End as if the process had died: for tests of failure handling."""
        await self._release()
        if not self._exited.done():
            self._exited.set_result(
                EngineExit(expected=False, returncode=-9, detail="simulated crash")
            )

    async def _release(self) -> None:
        """What it holds, let go however it ends: its port, its KV events' socket, the
        agent's feed of them."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self.server.kv_events is not None:
            self.server.kv_events.close()
        if self.kv_feed is not None:
            await self.kv_feed.close()

    async def wait(self) -> EngineExit:
        return await asyncio.shield(self._exited)


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m nodeagent.engines.sim --model-id M --port P`: one simulated engine, standalone."""
    parser = argparse.ArgumentParser(
        prog="python -m nodeagent.engines.sim", description=main.__doc__
    )
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--tpot-ms", type=float, default=5.0)
    parser.add_argument("--wake-seconds", type=float, default=0.5)
    parser.add_argument("--max-num-seqs", type=int, default=8)
    parser.add_argument("--block-tokens", type=int, default=16, help="prompt tokens per KV block")
    parser.add_argument("--cache-blocks", type=int, default=4096,
                        help="prefix-cache capacity in blocks (0: none)")  # fmt: skip
    parser.add_argument("--prefill-ms-per-token", type=float, default=0.0,
                        help="prefill time per prompt token not in the prefix cache")  # fmt: skip
    parser.add_argument("--enable-scale-out", action="store_true",
                        help="serve vLLM's render endpoints (a prompt's token ids), as "
                        "vLLM's --enable-scale-out does")  # fmt: skip
    parser.add_argument("--kv-events-endpoint", default="",
                        help="publish KV-cache events here as vLLM's --kv-events-config does "
                        "(tcp://*:PORT binds; '': none)")  # fmt: skip
    parser.add_argument(
        "--runner", choices=["generate", "pooling"], default="generate",
        help="pooling: serve /v1/embeddings (an embedding model), as vLLM's pooling runner",
    )  # fmt: skip
    parser.add_argument(
        "--event-loop", choices=["asyncio", "uvloop"], default="asyncio",
        help="uvloop: the loop an agent runs its in-process sim engines on (bench/gateway.py "
        "measures the sim's own CPU on both)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    settings = SimSettings(
        0.0, args.ttft_ms, args.tpot_ms, args.wake_seconds, args.max_num_seqs,
        block_tokens=args.block_tokens, cache_blocks=args.cache_blocks,
        prefill_ms_per_token=args.prefill_ms_per_token,
    )  # fmt: skip
    loop = None
    if args.event_loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    web.run_app(
        SimServer(
            args.model_id,
            settings,
            args.runner == "pooling",
            kv_events=args.kv_events_endpoint or None,
            enable_scale_out=args.enable_scale_out,
        ).app(),
        host=args.host,
        port=args.port,
        access_log=None,
        loop=loop,
    )


if __name__ == "__main__":
    main()
