"""`python bench/floor_proxy.py --port P --upstream URL`: the least a Python hop can add.

An ASGI application of thirty lines on the web process's own server (uvicorn, httptools,
uvloop) and the gateway's own client (aiohttp), forwarding each request's body to one
engine and its answer back, streamed or not: no keys, limits, usage, routing or failover.
`bench/gateway.py` measures it beside vllm-router, the gateway and the agent, as the floor
that a hop in Python with these libraries stands on.
"""

from __future__ import annotations

import argparse
from typing import Any

import aiohttp
import uvicorn

_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length"}


class Forward:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (message := await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            if self.session is not None:
                await self.session.close()
            await send({"type": "lifespan.shutdown.complete"})
            return
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=0)
            self.session = aiohttp.ClientSession(connector=connector, auto_decompress=False)
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = {"Content-Type": "application/json"}
        url = self.upstream + scope["path"]
        async with self.session.request(scope["method"], url, data=body,
                                        headers=headers) as answer:  # fmt: skip
            out = [(k.lower().encode(), v.encode()) for k, v in answer.headers.items()
                   if k.lower() not in _HOP_BY_HOP]  # fmt: skip
            if answer.content_type == "text/event-stream":
                await send({"type": "http.response.start", "status": answer.status,
                            "headers": out})  # fmt: skip
                async for chunk in answer.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body"})
                return
            data = await answer.read()
        out.append((b"content-length", str(len(data)).encode()))
        await send({"type": "http.response.start", "status": answer.status, "headers": out})
        await send({"type": "http.response.body", "body": data})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the engine, e.g. http://127.0.0.1:8001")
    args = parser.parse_args()
    uvicorn.run(Forward(args.upstream), host="127.0.0.1", port=args.port, loop="uvloop",
                http="httptools", access_log=False, log_level="warning")  # fmt: skip


if __name__ == "__main__":
    main()
