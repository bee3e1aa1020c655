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

This module is the engine behind the agent's Engine interface and the process
entry; its HTTP API is nodeagent.engines.simserver, its prefix cache (the KV model)
nodeagent.engines.simcache, and its deterministic answers nodeagent.engines.simanswers.
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

import aiohttp
from aiohttp import web

from nodeagent.config import SimSettings
from nodeagent.engines.base import EngineError, EngineExit, wait_until_ready
from nodeagent.engines.simserver import SimServer
from nodeagent.kvevents import KvFeed


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
