"""The control plane's side of the node agent's HTTP contract (shapes in nodeagent.protocol)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from nodeagent.protocol import (
    HeartbeatResponse,
    LoadModelRequest,
    LoadModelResponse,
    ProtocolError,
    UnloadModelResponse,
    check_contract,
    decode,
)

T = TypeVar("T")

# The code of an AgentCallFailed for an answer that does not follow the contract.
CONTRACT_VIOLATION = "contract_violation"


class AgentCallFailed(Exception):
    """The agent could not be reached, or answered with an error (its code and message)."""

    def __init__(self, message: str, *, code: str = "unreachable", status: int | None = None):
        super().__init__(message)
        self.code = code
        self.status = status


def _headers(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def _call(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    token: str,
    body: dict[str, Any] | None,
    seconds: float,
) -> bytes:
    """The body of the agent's 2xx answer; AgentCallFailed for anything else (its refusal,
    a redirect, no answer)."""
    try:
        async with session.request(
            method, url, json=body, headers=_headers(token),
            timeout=aiohttp.ClientTimeout(total=seconds), allow_redirects=False,
        ) as response:  # fmt: skip
            raw = await response.read()
            _refuse_redirect(url, response.status)
            if response.status >= 400:
                raise _refusal(url, response.status, raw)
            return raw
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise AgentCallFailed(f"{url}: {type(exc).__name__}: {exc}") from None


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    token: str,
    body: dict[str, Any],
    seconds: float,
    kind: type[T],
) -> T:
    """POST `body` and decode a 2xx answer as a `kind`; AgentCallFailed otherwise, with code
    CONTRACT_VIOLATION for an answer that does not follow the contract."""
    raw = await _call(session, "POST", url, token, body, seconds)
    try:
        return decode(raw, kind)
    except ProtocolError as exc:
        raise AgentCallFailed(
            f"{url} answered outside the contract: {exc}", code=CONTRACT_VIOLATION
        ) from None


def _refuse_redirect(url: str, status: int) -> None:
    """No redirect is followed from an agent (aiohttp follows them unless told not to): a
    `303 Location: http://169.254.169.254/` would have a worker fetch the cloud's metadata."""
    if 300 <= status < 400:
        raise AgentCallFailed(
            f"{url} answered with a redirect ({status}), refused", code=CONTRACT_VIOLATION
        )


def _refusal(url: str, status: int, raw: bytes) -> AgentCallFailed:
    """The agent's error answer: its `{"error": {"code", "message"}}`, whatever else it sent."""
    try:
        answer = json.loads(raw)
    except ValueError:
        answer = None
    error = answer.get("error") if isinstance(answer, dict) else None
    error = error if isinstance(error, dict) else {}
    return AgentCallFailed(
        str(error.get("message") or f"HTTP {status} from {url}"),
        code=str(error.get("code") or "agent_error"),
        status=status,
    )


async def load_model(
    base_url: str, token: str, request: LoadModelRequest, seconds: float
) -> LoadModelResponse:
    """`POST /load_model`: returns once the engine serves (or raises AgentCallFailed)."""
    async with aiohttp.ClientSession() as session:
        return await _post(
            session, f"{base_url}/load_model", token, request.to_json(), seconds, LoadModelResponse
        )


async def unload_model(
    base_url: str,
    token: str,
    model_id: str,
    to: str,
    seconds: float,
    *,
    force: bool = False,
    drain_seconds: float = 0.0,
) -> UnloadModelResponse:
    """`POST /unload_model`: where the model ended up (maybe lower than asked: see `note`)."""
    body = {"model_id": model_id, "to": to, "force": force, "drain_seconds": drain_seconds}
    async with aiohttp.ClientSession() as session:
        return await _post(
            session, f"{base_url}/unload_model", token, body, seconds, UnloadModelResponse
        )


async def unload_adapter(
    base_url: str, token: str, model_id: str, adapter_id: str, seconds: float
) -> None:
    """`POST /unload_adapter`: the LoRA adapter out of the engine of `model_id`."""
    async with aiohttp.ClientSession() as session:
        await _post(
            session,
            f"{base_url}/unload_adapter",
            token,
            {"model_id": model_id, "adapter_id": adapter_id},
            seconds,
            dict,
        )


async def set_credential(base_url: str, token: str, credential: str, seconds: float) -> None:
    """`POST /credential`: the agent keeps `credential` (called with its current `token`)."""
    async with aiohttp.ClientSession() as session:
        await _post(
            session, f"{base_url}/credential", token, {"credential": credential}, seconds, dict
        )


async def forget_credential(base_url: str, token: str, seconds: float) -> None:
    """`DELETE /credential`: the agent forgets its credential (it was revoked)."""
    async with aiohttp.ClientSession() as session:
        await _call(session, "DELETE", f"{base_url}/credential", token, None, seconds)


@dataclass(frozen=True)
class HeartbeatTarget:
    agent_pk: int
    base_url: str
    credential: str


@dataclass(frozen=True)
class HeartbeatResult:
    """One agent's answer, or why there is none. `rejected` is set when the agent answered
    outside the contract: it counts as a miss, and the reason is recorded on that agent."""

    agent_pk: int
    polled_at: float  # time.time() when the request was sent
    response: HeartbeatResponse | None
    error: str = ""
    rejected: bool = False


async def poll_heartbeats(
    targets: Sequence[HeartbeatTarget], *, seconds: float, concurrency: int = 256
) -> list[HeartbeatResult]:
    """Every agent's heartbeat, `concurrency` at a time over one connection pool, each called
    with its own credential (one without is not called: it is not enrolled, or revoked)."""
    limit = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, ttl_dns_cache=300)

    async def one(session: aiohttp.ClientSession, target: HeartbeatTarget) -> HeartbeatResult:
        async with limit:
            polled_at = time.time()
            if not target.credential:
                return HeartbeatResult(target.agent_pk, polled_at, None, "not enrolled (revoked?)")
            url = f"{target.base_url}/heartbeat"
            try:
                beat = await _post(session, url, target.credential, {}, seconds, HeartbeatResponse)
                check_contract(beat.contract)
            except AgentCallFailed as exc:
                rejected = exc.code == CONTRACT_VIOLATION
                return HeartbeatResult(target.agent_pk, polled_at, None, str(exc), rejected)
            except ProtocolError as exc:
                return HeartbeatResult(target.agent_pk, polled_at, None, str(exc), True)
            return HeartbeatResult(target.agent_pk, polled_at, beat)

    async with aiohttp.ClientSession(connector=connector) as session:
        return list(await asyncio.gather(*(one(session, target) for target in targets)))
