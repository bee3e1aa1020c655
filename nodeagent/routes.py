"""The node agent's HTTP API: the control API, heartbeats, health, metrics and the way
into the engines, with the middlewares that authenticate every call and turn errors
into the error bodies of nodeagent.protocol.

`AgentRoutes` is the handlers' side of the agent's server (nodeagent.server), which
builds the application from them and owns everything with a lifetime (the HTTP
client session, the engines, the registration with the control plane).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import shutil
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodeagent import __version__
from nodeagent.credential import well_formed
from nodeagent.errors import AgentError
from nodeagent.kvevents import KV_KEEPALIVE_SECONDS, TOKENIZER_FILES, kv_head, kv_lines
from nodeagent.protocol import (
    AGENT_ERROR_HEADER,
    CONTRACT_VERSION,
    CacheLevel,
    DiskInfo,
    HeartbeatResponse,
    LoadAdapterRequest,
    LoadModelRequest,
    ModelState,
    ProtocolError,
    UnloadAdapterRequest,
    UnloadModelRequest,
    error_body,
)

if TYPE_CHECKING:
    from nodeagent.server import AgentServer

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PATHS = {"/healthz"}
MAX_CONTROL_BODY = 1024 * 1024


def _bearer(request: web.Request) -> str:
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


def _error(status: int, code: str, message: str, model_id: str | None = None) -> web.Response:
    return web.json_response(
        error_body(code, message, model_id), status=status, headers={AGENT_ERROR_HEADER: code}
    )


async def _json_body(request: web.Request) -> Any:
    raw = await request.read()
    if not raw.strip():
        raise ProtocolError("the body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise ProtocolError(f"malformed JSON: {exc}") from None


class AgentRoutes:
    """The agent's request handlers and middlewares, over its server's parts."""

    def __init__(self, server: AgentServer) -> None:
        self.server = server
        self.config = server.config
        self.credentials = server.credentials
        self.gpu = server.gpu
        self.metrics = server.metrics
        self.proxy = server.proxy
        self.registry = server.registry

    def table(self) -> list[web.RouteDef]:
        return [
            web.post("/load_model", self.load_model),
            web.post("/unload_model", self.unload_model),
            web.post("/load_adapter", self.load_adapter),
            web.post("/unload_adapter", self.unload_adapter),
            web.post("/heartbeat", self.heartbeat),
            web.post("/credential", self.rotate_credential),
            web.delete("/credential", self.forget_credential),
            web.get("/healthz", self.healthz),
            web.get("/metrics", self.prometheus),
            # before the engine's paths: `/models/<model_id>/v1/...`
            web.get("/models/{model_id:.+}/kv", self.kv_blocks),
            web.get("/models/{model_id:.+}/tokenizer/{name}", self.tokenizer_file),
            web.route("*", "/models/{rest:.+}", self.inference),
        ]

    # --- middlewares ----------------------------------------------------------------------------

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in _OPEN_PATHS:
            return await handler(request)
        token = _bearer(request)
        if not token:
            return _error(401, "unauthorized", "missing 'Authorization: Bearer <credential>'")
        if self.credentials.accepts(token):
            return await handler(request)
        # Prometheus may scrape with the fleet's token: /metrics only reads.
        if request.path == "/metrics" and hmac.compare_digest(
            token.encode(), self.config.token.encode()
        ):
            return await handler(request)
        if not self.credentials.standalone and not self.credentials.enrolled:
            return _error(401, "not_enrolled", "this agent has not enrolled with its control plane")
        return _error(401, "unauthorized", "invalid credential for this agent")

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ProtocolError as exc:
            return _error(400, "bad_request", str(exc))
        except AgentError as exc:
            return _error(exc.status, exc.code, str(exc), exc.model_id)
        except web.HTTPRequestEntityTooLarge as exc:
            return _error(413, "body_too_large", exc.text or "request body too large")

    # --- control API ----------------------------------------------------------------------------

    async def _control_body(self, request: web.Request) -> Any:
        if request.content_length is not None and request.content_length > MAX_CONTROL_BODY:
            raise AgentError(
                "body_too_large", f"control requests are limited to {MAX_CONTROL_BODY} bytes", 413
            )
        return await _json_body(request)

    async def load_model(self, request: web.Request) -> web.Response:
        load = LoadModelRequest.from_json(await self._control_body(request))
        if self.server.draining:
            raise AgentError("agent_draining", "this agent is stopping", 503, load.model_id)
        # Shielded: a caller that gives up does not cancel the load others may be waiting on.
        result = await asyncio.shield(self.registry.load(load, self.server.session))
        return web.json_response(result.to_json())

    async def unload_model(self, request: web.Request) -> web.Response:
        unload = UnloadModelRequest.from_json(await self._control_body(request))
        if unload.drain_seconds and not unload.force:
            await self.server.drained(unload.model_id, unload.drain_seconds)
        result = await asyncio.shield(self.registry.unload(unload, self.server.session))
        return web.json_response(result.to_json())

    async def load_adapter(self, request: web.Request) -> web.Response:
        """`POST /load_adapter`: a LoRA adapter into the engine of `model_id` ahead of its first
        request (which would load it too); answers once the engine holds it."""
        load = LoadAdapterRequest.from_json(await self._control_body(request))
        if self.server.draining:
            raise AgentError("agent_draining", "this agent is stopping", 503, load.model_id)
        adapter = await self.registry.load_adapter(load.model_id, load.adapter, self.server.session)
        return web.json_response(
            {"status": "success", "model_id": load.model_id, "adapter": adapter.status().to_json()}
        )

    async def unload_adapter(self, request: web.Request) -> web.Response:
        unload = UnloadAdapterRequest.from_json(await self._control_body(request))
        await asyncio.shield(self.registry.unload_adapter(unload, self.server.session))
        return web.json_response(
            {"status": "success", "model_id": unload.model_id, "adapter_id": unload.adapter_id}
        )

    async def rotate_credential(self, request: web.Request) -> web.Response:
        """`POST /credential {"credential"}`: the control plane rotates this agent's credential
        (the call carries the current one); the previous one is taken a while longer. The new
        one is kept only once CONTROL_PLANE_URL confirms it issues it: the current credential
        alone (leaked, say) cannot rotate this agent to a credential of the caller's own."""
        body = await self._control_body(request)
        credential = body.get("credential") if isinstance(body, dict) else None
        if self.credentials.standalone:
            raise AgentError("no_control_plane", "this agent has no control plane", 409)
        if not self.credentials.may_rotate(_bearer(request)):
            raise AgentError("unauthorized", "only the current credential may rotate it", 401)
        if not isinstance(credential, str) or not well_formed(credential):
            raise ProtocolError("'credential' must be a credential the control plane issued")
        await self.server.confirm_with_control_plane(credential, revocation=False)
        self.credentials.store(credential)
        log.info("credential rotated")
        return web.json_response({"status": "success"})

    async def forget_credential(self, request: web.Request) -> web.Response:
        """`DELETE /credential`: the control plane revoked this agent; from now on it takes no
        call until it enrols again (which an operator must allow)."""
        if self.credentials.standalone:
            raise AgentError("no_control_plane", "this agent has no control plane", 409)
        # Only its control plane may: whoever else holds the credential could lock us out.
        await self.server.confirm_with_control_plane(_bearer(request), revocation=True)
        self.credentials.forget()
        log.warning("credential revoked by the control plane: this agent takes no calls now")
        return web.json_response({"status": "success"})

    async def heartbeat(self, request: web.Request) -> web.Response:
        if request.can_read_body:  # a body is optional; when sent, it must be JSON
            await self._control_body(request)
        await self.registry.refresh_stats(self.server.session)
        return web.json_response(self.heartbeat_snapshot().to_json())

    def heartbeat_snapshot(self) -> HeartbeatResponse:
        gpus = self.gpu.snapshot()
        utilizations = [gpu.utilization for gpu in gpus if gpu.utilization is not None]
        disk = shutil.disk_usage(self.config.cache_dir)
        models = self.registry.statuses()
        return HeartbeatResponse(
            agent_id=self.config.agent_id,
            state=self.server.agent_state(),
            version=__version__,
            gpus=tuple(gpus),
            gpu_utilization=sum(utilizations) / len(utilizations) if utilizations else None,
            gpu_memory_total=sum(gpu.memory_total for gpu in gpus),
            gpu_memory_free=sum(gpu.memory_free for gpu in gpus),
            vllm_queue_length=sum(model.requests_waiting for model in models),
            disk=DiskInfo(
                str(self.config.cache_dir), disk.total, disk.free, self.registry.models_bytes()
            ),
            models=tuple(models),
            contract=CONTRACT_VERSION,
        )

    async def kv_blocks(self, request: web.Request) -> web.StreamResponse:
        """The KV blocks the model's engine holds (nodeagent.kvevents), one JSON line each:
        first all of them, then each change as it comes, with an empty line when nothing
        changed for KV_KEEPALIVE_SECONDS (a follower that hears nothing longer knows the
        agent is gone). Ends when the engine does: the next engine's blocks are another
        feed."""
        model_id = request.match_info["model_id"]
        slot = self.registry.slots.get(model_id)
        engine = slot.engine if slot is not None and slot.serving else None
        if engine is None:
            return _error(404, "model_not_ready", f"{model_id} has no engine serving", model_id)
        if engine.kv_feed is None:
            return _error(404, "kv_events_off", f"{model_id}'s engine publishes no KV events",
                          model_id)  # fmt: skip
        feed = engine.kv_feed
        block_size, names, follower = feed.follow()
        try:
            response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
            await response.prepare(request)
            await response.write(b"".join(kv_head(model_id, engine.name, block_size, names)))
            while True:
                try:
                    change = await asyncio.wait_for(follower.changes.get(), KV_KEEPALIVE_SECONDS)
                except TimeoutError:
                    await response.write(b"\n")
                    continue
                lines = []
                while change is not None:  # everything queued, in one write
                    lines += kv_lines(change, feed.blocks.block_size)
                    if follower.changes.empty():
                        break
                    change = follower.changes.get_nowait()
                if lines:
                    await response.write(b"".join(lines))
                if change is None:
                    break
        finally:
            feed.unfollow(follower)
        return response

    async def tokenizer_file(self, request: web.Request) -> web.StreamResponse:
        """One of the served model's tokenizer files (TOKENIZER_FILES), as its checkpoint
        has it: the gateway reads prompts into the engine's tokens with them (precise
        routing)."""
        model_id, name = request.match_info["model_id"], request.match_info["name"]
        slot = self.registry.slots.get(model_id)
        if name not in TOKENIZER_FILES:
            return _error(404, "not_found", f"{name} is not a tokenizer file", model_id)
        directory = slot.directory if slot is not None else None
        if directory is None or not (directory / name).is_file():
            return _error(404, "not_found", f"{model_id} has no {name} here", model_id)
        return web.FileResponse(directory / name)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"status": "ok", "agent_id": self.config.agent_id, "version": __version__}
        )

    async def prometheus(self, request: web.Request) -> web.Response:
        levels: dict[str, int] = {}
        for slot in self.registry.slots.values():
            levels[slot.cache_level] = levels.get(slot.cache_level, 0) + 1
        for level in CacheLevel:
            self.metrics.models.labels(level).set(levels.get(level, 0))
        standbys = self.registry.loads.engines.standbys
        for state, count in (standbys.counts if standbys else {"ready": 0, "starting": 0}).items():
            self.metrics.standby_engines.labels(state).set(count)
        # RuntimeError: the session closed as the agent stops; the last figures stand.
        with contextlib.suppress(RuntimeError):
            await self.registry.refresh_stats(self.server.session)
        self.metrics.prefix_cache_queries.clear()
        self.metrics.prefix_cache_hits.clear()
        self.metrics.engine_ttft.by_model = {
            slot.model_id: slot.stats for slot in self.registry.slots.values() if slot.serving
        }
        for slot in self.registry.slots.values():
            stats = slot.stats
            if slot.serving and stats.prefix_cache_queries is not None:
                self.metrics.prefix_cache_queries.labels(slot.model_id).set(
                    stats.prefix_cache_queries
                )
                self.metrics.prefix_cache_hits.labels(slot.model_id).set(
                    stats.prefix_cache_hits or 0.0
                )
        downloading = [s for s in self.registry.slots.values() if s.state == ModelState.DOWNLOADING]
        self.metrics.download_throughput.set(sum(s.progress.bytes_per_second for s in downloading))
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def inference(self, request: web.Request) -> web.StreamResponse:
        return await self.proxy.handle(request, self.server.session)
