"""The simulated engine's HTTP API: what vLLM's OpenAI-compatible server answers, for one model.

Completions, chat completions and the Responses API (streamed as SSE like vLLM's),
embeddings for a pooling runner, vLLM-named `/metrics`, LoRA adapters loaded at run
time, the render endpoints and the sleep endpoints, each with vLLM's errors. It takes
`ttft_ms` to the first token, `tpot_ms` to each next one and `prefill_ms_per_token`
for each prompt token its prefix cache (nodeagent.engines.simcache) did not hold, and
runs at most `max_num_seqs` requests at once; its time to first token is reported as
vLLM's is (nodeagent.engines.simprefill). Its words are nodeagent.engines.simanswers'.
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from nodeagent.config import SimSettings
from nodeagent.engines.simanswers import (
    EMBEDDING_DIMENSIONS,
    completion_body,
    embedding_for,
    finished_response,
    input_texts,
    response_object,
    words_for,
)
from nodeagent.engines.simcache import PrefixCache
from nodeagent.engines.simprefill import TtftHistogram
from nodeagent.kvblocks import sim_prompt, sim_responses_text, word_ids
from nodeagent.kvevents import KvEventPublisher


def _error(status: int, message: str) -> web.Response:
    body = {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}
    return web.json_response(body, status=status)


@dataclass
class _Counters:
    running: int = 0
    waiting: int = 0
    prefix_queries: int = 0
    prefix_hits: int = 0
    generation_tokens: int = 0


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
        self.ttft = TtftHistogram()
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
        texts = input_texts(body.get("input"))
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
        arrived = time.monotonic()
        async with self._seat():
            self.ttft.observe(time.monotonic() - arrived + self.settings.ttft_ms / 1000)
            response = response_object(body["model"], body, usage)
            if not body.get("stream"):
                await asyncio.sleep(self._seconds_for(len(tokens)))
                self.counters.generation_tokens += len(tokens)
                return web.json_response(finished_response(response, " ".join(tokens), usage))
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
            {"type": "response.completed", "response": finished_response(response, text, usage)},
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
        arrived = time.monotonic()  # after the sim's own bookkeeping, which it does not model
        async with self._seat():
            self._log_request(body, prompt, request.headers.get("traceparent"))
            # The time it models (simprefill): its wait for a seat, then its prefill and first
            # token's times as set, whenever its event loop wakes.
            self.ttft.observe(time.monotonic() - arrived + prefill + self.settings.ttft_ms / 1000)
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
            return web.json_response(completion_body(chat, " ".join(tokens), usage, body["model"]))

    def _log_request(self, body: dict[str, Any], prompt: str, traceparent: str | None) -> None:
        """The request the engine took, to --sim-request-log (what "sent once" is checked
        against), with the trace it continues, as vLLM's would (traces' tests)."""
        if self.settings.request_log:
            entry = {"model": body.get("model"), "prompt": prompt, "traceparent": traceparent}
            with open(self.settings.request_log, "a") as log:
                log.write(json.dumps(entry) + "\n")

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
            *self.ttft.lines(label[1:-1]),
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
