"""`python bench/otlp_sink.py --port P`: a collector stand-in that takes OTLP/HTTP trace exports
and discards them (`bench/gateway.py` measures the gateway with tracing on against it).

It answers each export with an empty ExportTraceServiceResponse (an empty protobuf message is
zero bytes) and counts what it took: GET /count says how many exports and bytes, so the
benchmark knows the traced path really exported.
"""

from __future__ import annotations

import argparse

import uvloop
from aiohttp import web


def app() -> web.Application:
    taken = {"exports": 0, "bytes": 0}

    async def export(request: web.Request) -> web.Response:
        taken["bytes"] += len(await request.read())
        taken["exports"] += 1
        return web.Response(body=b"", content_type="application/x-protobuf")

    async def count(request: web.Request) -> web.Response:
        return web.json_response(taken)

    application = web.Application(client_max_size=64 * 1024 * 1024)
    application.router.add_post("/v1/traces", export)
    application.router.add_get("/count", count)
    application.router.add_get("/health", count)
    return application


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    web.run_app(app(), host="127.0.0.1", port=args.port, access_log=None,
                loop=uvloop.new_event_loop(), print=None)  # fmt: skip


if __name__ == "__main__":
    main()
