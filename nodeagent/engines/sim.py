"""The `sim` engine: a simulated OpenAI-compatible engine, for fleet-scale tests without GPUs.

In the spirit of llm-d's inference simulator: it takes a configurable time to
load, to produce the first token and each next one; its text is deterministic
(the same prompt gives the same words); it streams SSE like vLLM, reports
`usage`, exposes vLLM-named `/metrics`, and implements vLLM's sleep endpoints
(`/sleep?level=1`, `/wake_up`, `/is_sleeping`) so the DRAM tier is exercised
without a GPU. It runs inside the agent's event loop on a 127.0.0.1 port, so
many sim agents fit on a small machine; `python -m nodeagent.engines.sim`
runs one alone.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from nodeagent.config import SimSettings
from nodeagent.engines.base import EngineError, EngineExit, wait_until_ready

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


def _prompt_of(body: dict[str, Any], chat: bool) -> str:
    if chat:
        return "\n".join(str(message.get("content", "")) for message in body.get("messages", []))
    prompt = body.get("prompt", "")
    return prompt if isinstance(prompt, str) else json.dumps(prompt)


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


class SimServer:
    """The simulated engine's HTTP API for one served model."""

    def __init__(self, model_id: str, settings: SimSettings) -> None:
        self.model_id = model_id
        self.settings = settings
        self.sleeping = False
        self.counters = _Counters()
        self.seats = asyncio.Semaphore(settings.max_num_seqs)
        self.seen_prompts: set[str] = set()
        self.created = int(time.time())

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes(
            [
                web.get("/health", self.health),
                web.get("/v1/models", self.models),
                web.post("/v1/chat/completions", self.chat_completions),
                web.post("/v1/completions", self.completions),
                web.get("/metrics", self.metrics),
                web.post("/sleep", self.sleep),
                web.post("/wake_up", self.wake_up),
                web.get("/is_sleeping", self.is_sleeping),
            ]
        )
        return app

    async def health(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def models(self, request: web.Request) -> web.Response:
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "llmfleet-sim",
        }
        return web.json_response({"object": "list", "data": [entry]})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._complete(request, chat=False)

    async def _complete(self, request: web.Request, chat: bool) -> web.StreamResponse:
        if self.sleeping:
            return _error(503, "the engine is sleeping")
        try:
            body = await request.json()
        except ValueError as exc:
            return _error(400, f"malformed JSON: {exc}")
        if not isinstance(body, dict):
            return _error(400, "the body must be a JSON object")
        if body.get("model") != self.model_id:
            return _error(404, f"The model `{body.get('model')}` does not exist.")
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens", 16))
        if not isinstance(max_tokens, int) or max_tokens < 1:
            return _error(400, "max_tokens must be a positive integer")
        prompt = _prompt_of(body, chat)
        self._count_prefix(prompt)
        self.counters.waiting += 1
        try:
            await self.seats.acquire()
        finally:
            self.counters.waiting -= 1
        self.counters.running += 1
        try:
            tokens = words_for(prompt, max_tokens)
            usage = {
                "prompt_tokens": len(prompt.split()),
                "completion_tokens": len(tokens),
                "total_tokens": len(prompt.split()) + len(tokens),
            }
            if body.get("stream"):
                return await self._stream(request, body, chat, tokens, usage)
            await asyncio.sleep(self._seconds_for(len(tokens)))
            self.counters.generation_tokens += len(tokens)
            return web.json_response(self._full(chat, " ".join(tokens), usage))
        finally:
            self.counters.running -= 1
            self.seats.release()

    def _count_prefix(self, prompt: str) -> None:
        tokens = len(prompt.split())
        self.counters.prefix_queries += tokens
        if prompt in self.seen_prompts:
            self.counters.prefix_hits += tokens
        self.seen_prompts.add(prompt)

    def _seconds_for(self, tokens: int) -> float:
        return (self.settings.ttft_ms + self.settings.tpot_ms * max(tokens - 1, 0)) / 1000

    def _full(self, chat: bool, text: str, usage: dict[str, int]) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": "length", "logprobs": None}
        if chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text
        return {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
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
        async for chunk in self._chunks(chat, tokens, usage if include_usage else None):
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    async def _chunks(
        self, chat: bool, tokens: list[str], usage: dict[str, int] | None
    ) -> AsyncIterator[dict[str, Any]]:
        base = {
            "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": self.model_id,
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

    def __init__(self, model_id: str, settings: SimSettings) -> None:
        self.model_id = model_id
        self.settings = settings
        self.server = SimServer(model_id, settings)
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
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if not self._exited.done():
            self._exited.set_result(EngineExit(expected=True, returncode=0, detail="stopped"))

    async def crash(self) -> None:
        """End as if the process had died: for tests of failure handling."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if not self._exited.done():
            self._exited.set_result(
                EngineExit(expected=False, returncode=-9, detail="simulated crash")
            )

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
    args = parser.parse_args(argv)
    settings = SimSettings(0.0, args.ttft_ms, args.tpot_ms, args.wake_seconds, args.max_num_seqs)
    web.run_app(
        SimServer(args.model_id, settings).app(), host=args.host, port=args.port, access_log=None
    )


if __name__ == "__main__":
    main()
