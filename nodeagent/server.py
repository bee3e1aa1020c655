"""The node agent's HTTP server: its lifetime, and its calls to the control plane.

One `AgentServer` holds everything with a lifetime: one HTTP client session
opened at start-up and closed at shutdown, the NVML session, the engines.
Signal handlers only set a flag; `serve` does the stopping, and stops every
engine before it returns. It registers with the control plane (enrolling for a
credential), reports load progress and says when it drains. The handlers of
its HTTP API (control API, inference proxy, health and metrics) are
nodeagent.routes'.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import signal
from collections.abc import Callable, Sequence
from urllib.parse import quote

import aiohttp
from aiohttp import web

from nodeagent import __version__
from nodeagent.config import AgentConfig
from nodeagent.credential import Credentials
from nodeagent.errors import AgentError
from nodeagent.gpu import GpuMonitor
from nodeagent.metrics import AgentMetrics
from nodeagent.progress import ProgressReporter
from nodeagent.protocol import (
    CONTRACT_VERSION,
    AgentReportedState,
    LoadProgress,
    ModelStatus,
    RegisterRequest,
)
from nodeagent.proxy import InferenceProxy
from nodeagent.registry import ModelRegistry
from nodeagent.routes import AgentRoutes
from nodeagent.tracing import Tracer

log = logging.getLogger(__name__)

MAX_PROXY_BODY = 64 * 1024 * 1024  # long prompts and images in chat requests
REGISTER_BACKOFF_MAX = 60.0
# A progress report is worth sending only while it is news.
PROGRESS_TIMEOUT_SECONDS = 2.0


class AgentServer:
    """The node agent: its parts, their start and stop, and its registration."""

    def __init__(self, config: AgentConfig, environ: dict[str, str] | None = None) -> None:
        self.config = config
        self.metrics = AgentMetrics()
        self.gpu = GpuMonitor()
        self.registry = ModelRegistry(
            config, self.metrics, self.gpu.available, environ or dict(os.environ)
        )
        # None unless an OTLP endpoint is set: then spans for every proxied request.
        self.tracer = Tracer("llmfleet-agent", endpoint, config.trace_sample_percent / 100) if (
            endpoint := config.traces_endpoint
        ) else None  # fmt: skip
        self.proxy = InferenceProxy(
            self.registry, self.metrics, config.batch_reserve_percent, config.batch_wait_seconds,
            self.tracer,
        )  # fmt: skip
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
        self.routes = AgentRoutes(self)

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "the server has not started"
        return self._session

    # --- lifecycle ------------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(
            middlewares=[self.routes.errors, self.routes.auth], client_max_size=MAX_PROXY_BODY
        )
        app.add_routes(self.routes.table())
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
        if self.tracer is not None:  # the spans still buffered, exported before the agent exits
            await asyncio.to_thread(self.tracer.shutdown)

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

    async def drained(self, model_id: str, seconds: float) -> None:
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

    async def confirm_with_control_plane(self, credential: str, *, revocation: bool) -> None:
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
