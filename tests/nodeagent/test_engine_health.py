"""When an engine that answered 5xx is dead: its /health says so, or nothing listens. A slow
/health (a busy engine) is not a death: the agent would otherwise kill a healthy engine."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from nodeagent.engines.base import is_dead
from tests.support import free_port


@pytest.mark.parametrize(
    ("status", "delay", "dead"), [(200, 0, False), (503, 0, True), (500, 0, True), (200, 3, False)]
)
async def test_an_engine_is_dead_only_when_it_says_so_or_is_gone(status, delay, dead):
    async def health(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        return web.Response(status=status)

    app = web.Application()
    app.router.add_get("/health", health)
    async with TestServer(app) as server, aiohttp.ClientSession() as session:
        assert await is_dead(session, str(server.make_url("")).rstrip("/")) is dead


async def test_an_engine_nobody_listens_for_is_dead():
    async with aiohttp.ClientSession() as session:
        assert await is_dead(session, f"http://127.0.0.1:{free_port()}")
