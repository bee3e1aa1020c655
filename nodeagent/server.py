"""The node agent's HTTP server: control API, inference proxy, health and metrics.

One `AgentServer` holds everything with a lifetime: one HTTP client session
opened at start-up and closed at shutdown, the NVML session, the engines.
Signal handlers only set a flag; `serve` does the stopping, and stops every
engine before it returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import random
import shutil
import signal
from collections.abc import Awaitable, Callable, Sequence
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from nodeagent import __version__
from nodeagent.config import AgentConfig
from nodeagent.credential import Credentials, well_formed
from nodeagent.errors import AgentError
from nodeagent.gpu import GpuMonitor
from nodeagent.kvevents import KV_KEEPALIVE_SECONDS, TOKENIZER_FILES, kv_head, kv_lines
from nodeagent.metrics import AgentMetrics
from nodeagent.progress import ProgressReporter
from nodeagent.protocol import (
    AGENT_ERROR_HEADER,
    CONTRACT_VERSION,
    AgentReportedState,
    CacheLevel,
    DiskInfo,
    HeartbeatResponse,
    LoadAdapterRequest,
    LoadModelRequest,
    LoadProgress,
    ModelState,
    ModelStatus,
    ProtocolError,
    RegisterRequest,
    UnloadAdapterRequest,
    UnloadModelRequest,
    error_body,
)
from nodeagent.proxy import InferenceProxy
from nodeagent.registry import ModelRegistry

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_OPEN_PATHS = {"/healthz"}
MAX_CONTROL_BODY = 1024 * 1024
MAX_PROXY_BODY = 64 * 1024 * 1024  # long prompts and images in chat requests
REGISTER_BACKOFF_MAX = 60.0
# A progress report is worth sending only while it is news.
PROGRESS_TIMEOUT_SECONDS = 2.0


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


class AgentServer:
    def __init__(self, config: AgentConfig, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.gpu = GpuMonitor()
        self.registry = ModelRegistry(
            config, self.metrics, self.gpu.available, environ or dict(os.environ)
        )
        self.proxy = InferenceProxy(
            self.registry, self.metrics, config.batch_reserve_percent, config.batch_wait_seconds
        )
        self.credentials = Credentials(
            config.credential_path, config.token, standalone=not config.control_plane_url
        )
        # After the control plane refused the kept credential: enrol once more with the token.
        self._enrol_next = False
        self._session: aiohttp.ClientSession | None = None
        self._register_task: asyncio.Task[None] | None = None
        self.progress: ProgressReporter | None = None
        self.stop_requested = asyncio.Event()
        self.registered = asyncio.Event()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the server has not started"
        return self._session

    # --- lifecycle ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self._errors, self._auth], client_max_size=MAX_PROXY_BODY
        )
        app.add_routes(
            [
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
        )
        app.on_startup.append(self._startup)
        app.on_shutdown.append(self._shutdown)
        return app

    async def _startup(self, app: web.Application) -> None:
        for directory in (self.config.models_dir, self.config.logs_dir):
            directory.mkdir(parents=True, exist_ok=True)
        # Engines answer on loopback; the agent's own limits apply, not aiohttp's defaults.
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector, skip_auto_headers={"Accept-Encoding"}
        )
        self.registry.restore()
        self.registry.loads.start([gpu.name for gpu in self.gpu.snapshot()])
        self.credentials.load()
        if self.config.control_plane_url:
            self._register_task = asyncio.create_task(self.register_until_accepted())
            self.progress = ProgressReporter(self.registry.loading_statuses, self._send_progress)
            self.registry.on_phase = self.progress.poke
            self.progress.start()

    async def _shutdown(self, app: web.Application) -> None:
        if self._register_task is not None:
            self._register_task.cancel()
        if self.progress is not None:
            await self.progress.close()
        # aiohttp runs this before it waits for open handlers: `drain` has let them finish.
        await self.registry.stop_all()
        self.proxy.engines.close()
        if self._session is not None:
            await self._session.close()
        self.gpu.close()

    async def start(self) -> web.AppRunner:
        """Listen; the returned runner's cleanup() stops the agent and its engines."""
        # handler_cancellation: a client that disconnects cancels its proxied engine request.
        runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, self.config.host, self.config.port).start()
        return runner

    async def serve(self) -> None:
        """Listen until SIGTERM or SIGINT, then stop every engine and return."""
        runner = await self.start()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self.stop_requested.set)
        log.info(
            "agent %s listening on %s:%d (engine %s, cache %s, GPUs: %d)",
            self.config.agent_id, self.config.host, self.config.port, self.config.engine,
            self.config.cache_dir, len(self.gpu.snapshot()),
        )  # fmt: skip
        try:
            await self.stop_requested.wait()
            await self.drain()
            log.info("stopping the engines")
        finally:
            await runner.cleanup()

    @property
    def draining(self) -> bool:
        return self.proxy.draining

    def in_flight(self) -> int:
        return sum(slot.in_flight for slot in self.registry.slots.values())

    async def drain(self) -> None:
        """Take no new requests or loads, tell the control plane, and give the requests in
        flight up to `drain_seconds` to finish."""
        self.proxy.draining = True
        log.info("draining: %d request(s) in flight, up to %.0f s", self.in_flight(),
                 self.config.drain_seconds)  # fmt: skip
        if self.config.control_plane_url:
            if self._register_task is not None:
                self._register_task.cancel()
            await self._say_draining()
        await self._until_ended(self.in_flight, self.config.drain_seconds)
        if self.in_flight():
            log.warning("drain period over: cutting %d request(s)", self.in_flight())

    async def _drained(self, model_id: str, seconds: float) -> None:
        """Until the model's requests in flight have finished, or `seconds` have passed (the
        control plane routes no new ones here meanwhile: the placement is UNLOADING)."""
        slot = self.registry.slots.get(model_id)
        if slot is not None:
            await self._until_ended(lambda: slot.in_flight, seconds)

    async def _until_ended(self, in_flight: Callable[[], int], seconds: float) -> None:
        """Until `in_flight()` is 0, waking as each proxied request ends, or `seconds` pass."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while in_flight() and loop.time() < deadline:
            self.proxy.request_ended.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.proxy.request_ended.wait(), deadline - loop.time())

    async def _say_draining(self) -> None:
        """One registration saying DRAINING, so routing stops before the next heartbeat."""
        try:
            status, text = await self._register_once(seconds=5)
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning("could not tell the control plane that this agent drains: %s", exc)
            return
        if status not in (200, 201):
            log.warning("the control plane refused the drain: HTTP %d %s", status, text[:300])

    async def _register_once(self, seconds: float) -> tuple[int, str]:
        """POST /api/agents/register with what the agent is now; its status and body. A
        credential in the answer (the first registration's, or a re-enrolment's) is kept."""
        body = RegisterRequest(
            agent_id=self.config.agent_id,
            base_url=self.config.advertise_url,
            version=__version__,
            state=self.agent_state(),
            gpus=tuple(self.gpu.snapshot()),
            labels=self.config.labels,
            contract=CONTRACT_VERSION,
        ).to_json()
        enrolling = self._enrol_next or not self.credentials.enrolled
        token = self.config.token if enrolling else self.credentials.current
        async with self.session.post(
            f"{self.config.control_plane_url}/api/agents/register",
            json=body,
            headers={"Authorization": f"Bearer {token}"},
            timeout=aiohttp.ClientTimeout(total=seconds),
            allow_redirects=False,  # the token goes to CONTROL_PLANE_URL or nowhere
        ) as response:
            status, text = response.status, await response.text()
        if status in (200, 201):
            self._keep_issued(text)
        # A kept credential the control plane does not know (a new database, a revocation):
        # the next try enrols with the token; a refused enrolment goes back to the credential.
        self._enrol_next = status == 401 and not enrolling and self.credentials.enrolled
        return status, text

    async def _send_progress(self, statuses: Sequence[ModelStatus]) -> None:
        """One progress report (nodeagent.progress): raises on any failure, which it logs."""
        if not self.credentials.enrolled:
            return  # nothing to say it with yet; the load's answer will
        body = LoadProgress(agent_id=self.config.agent_id, models=tuple(statuses)).to_json()
        async with self.session.post(
            f"{self.config.control_plane_url}/api/agents/{quote(self.config.agent_id, safe='')}"
            "/progress",
            json=body,
            headers={"Authorization": f"Bearer {self.credentials.current}"},
            timeout=aiohttp.ClientTimeout(total=PROGRESS_TIMEOUT_SECONDS),
            allow_redirects=False,
        ) as response:
            if response.status != 204:
                raise aiohttp.ClientError(f"HTTP {response.status} {(await response.text())[:200]}")

    def _keep_issued(self, text: str) -> None:
        try:
            issued = json.loads(text).get("credential", "")
        except (ValueError, AttributeError):
            return
        if isinstance(issued, str) and issued:
            try:
                self.credentials.store(issued)
            except (OSError, ValueError) as exc:
                # Not kept, so not enrolled: the next try enrols again (the control plane
                # issues anew while the credential was never used).
                log.error("could not keep the issued credential in %s: %s",
                          self.credentials.path, exc)  # fmt: skip
                raise aiohttp.ClientError(f"credential not kept: {exc}") from None
            log.info("enrolled: credential kept in %s", self.credentials.path)

    def agent_state(self) -> AgentReportedState:
        return AgentReportedState.DRAINING if self.draining else self.registry.agent_state()

    async def register_until_accepted(self) -> None:
        """POST /api/agents/register until accepted, backing off while the control plane is down."""
        delay = 0.5
        while True:
            try:
                status, text = await self._register_once(seconds=10)
                if status in (200, 201):
                    log.info(
                        "registered with %s as %s",
                        self.config.control_plane_url,
                        self.config.agent_id,
                    )
                    self.registered.set()
                    return
                log.warning("registration refused: HTTP %d %s", status, text[:300])
            except (aiohttp.ClientError, TimeoutError) as exc:
                log.warning(
                    "control plane unreachable (%s); retrying in %.1f s",
                    exc or type(exc).__name__,
                    delay,
                )
            # Jitter spreads out a fleet of agents restarting together.
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))  # noqa: S311
            delay = min(delay * 2, REGISTER_BACKOFF_MAX)

    # --- middlewares ----------------------------------------------------------------------------

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
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
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
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
        if self.draining:
            raise AgentError("agent_draining", "this agent is stopping", 503, load.model_id)
        # Shielded: a caller that gives up does not cancel the load others may be waiting on.
        result = await asyncio.shield(self.registry.load(load, self.session))
        return web.json_response(result.to_json())

    async def unload_model(self, request: web.Request) -> web.Response:
        unload = UnloadModelRequest.from_json(await self._control_body(request))
        if unload.drain_seconds and not unload.force:
            await self._drained(unload.model_id, unload.drain_seconds)
        result = await asyncio.shield(self.registry.unload(unload, self.session))
        return web.json_response(result.to_json())

    async def load_adapter(self, request: web.Request) -> web.Response:
        """`POST /load_adapter`: a LoRA adapter into the engine of `model_id` ahead of its first
        request (which would load it too); answers once the engine holds it."""
        load = LoadAdapterRequest.from_json(await self._control_body(request))
        if self.draining:
            raise AgentError("agent_draining", "this agent is stopping", 503, load.model_id)
        adapter = await self.registry.load_adapter(load.model_id, load.adapter, self.session)
        return web.json_response(
            {"status": "success", "model_id": load.model_id, "adapter": adapter.status().to_json()}
        )

    async def unload_adapter(self, request: web.Request) -> web.Response:
        unload = UnloadAdapterRequest.from_json(await self._control_body(request))
        await asyncio.shield(self.registry.unload_adapter(unload, self.session))
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
        await self._confirm_with_control_plane(credential, revocation=False)
        self.credentials.store(credential)
        log.info("credential rotated")
        return web.json_response({"status": "success"})

    async def _confirm_with_control_plane(self, credential: str, *, revocation: bool) -> None:
        """Raise AgentError unless the control plane says it is issuing `credential` to us (or,
        with `revocation`, that it revoked it)."""
        url = (
            f"{self.config.control_plane_url}/api/agents/"
            f"{quote(self.config.agent_id, safe='')}/credential/confirm"
        )
        try:
            async with self.session.post(
                url, json={"revocation": revocation},
                headers={"Authorization": f"Bearer {credential}"},
                timeout=aiohttp.ClientTimeout(total=5), allow_redirects=False,
            ) as response:  # fmt: skip
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AgentError(
                "credential_unconfirmed", f"could not ask the control plane: {exc}", 503
            ) from None
        if status != 204:
            log.warning("refused a rotation to a credential the control plane did not confirm")
            raise AgentError(
                "credential_unconfirmed",
                f"the control plane did not confirm this credential (HTTP {status})",
                403,
            )

    async def forget_credential(self, request: web.Request) -> web.Response:
        """`DELETE /credential`: the control plane revoked this agent; from now on it takes no
        call until it enrols again (which an operator must allow)."""
        if self.credentials.standalone:
            raise AgentError("no_control_plane", "this agent has no control plane", 409)
        # Only its control plane may: whoever else holds the credential could lock us out.
        await self._confirm_with_control_plane(_bearer(request), revocation=True)
        self.credentials.forget()
        log.warning("credential revoked by the control plane: this agent takes no calls now")
        return web.json_response({"status": "success"})

    async def heartbeat(self, request: web.Request) -> web.Response:
        if request.can_read_body:  # a body is optional; when sent, it must be JSON
            await self._control_body(request)
        await self.registry.refresh_stats(self.session)
        return web.json_response(self.heartbeat_snapshot().to_json())

    def heartbeat_snapshot(self) -> HeartbeatResponse:
        gpus = self.gpu.snapshot()
        utilizations = [gpu.utilization for gpu in gpus if gpu.utilization is not None]
        disk = shutil.disk_usage(self.config.cache_dir)
        models = self.registry.statuses()
        return HeartbeatResponse(
            agent_id=self.config.agent_id,
            state=self.agent_state(),
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
            await self.registry.refresh_stats(self.session)
        self.metrics.prefix_cache_queries.clear()
        self.metrics.prefix_cache_hits.clear()
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
        return await self.proxy.handle(request, self.session)
