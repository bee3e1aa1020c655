"""The agent and its control plane: registration, the credential it is issued and keeps,
rotation and revocation."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from tests.nodeagent.conftest import TOKEN, sim_args, start_agent


async def test_registration_retries_with_backoff_until_the_control_plane_answers(tmp_path) -> None:
    calls: list[dict] = []

    async def register(request: web.Request) -> web.Response:
        calls.append({"auth": request.headers.get("Authorization"), "body": await request.json()})
        if len(calls) < 3:
            return web.json_response({"detail": "starting"}, status=503)
        return web.json_response({"agent_id": "test-agent", "created": True}, status=201)

    control_plane = web.Application()
    control_plane.router.add_post("/api/agents/register", register)
    async with TestServer(control_plane) as cp:
        server, test_server, _ = await start_agent(
            sim_args(tmp_path / "cache", "--control-plane-url", str(cp.make_url("")).rstrip("/"))
        )
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
        finally:
            await test_server.close()
    assert len(calls) == 3
    assert calls[-1]["auth"] == f"Bearer {TOKEN}"
    assert calls[-1]["body"]["agent_id"] == "test-agent"
    assert calls[-1]["body"]["gpus"] == []


ISSUED = "lfa_" + "a" * 64


ROTATED = "lfa_" + "b" * 64


async def test_an_agent_enrols_keeps_its_credential_and_takes_no_other_token(tmp_path) -> None:
    calls: list[str | None] = []

    async def register(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Authorization"))
        if calls[-1] == f"Bearer {TOKEN}":
            body = {"agent_id": "test-agent", "created": True, "credential": ISSUED}
            return web.json_response(body, status=201)
        return web.json_response({"agent_id": "test-agent", "created": False}, status=200)

    async def confirm(request: web.Request) -> web.Response:
        # The control plane issues ROTATED, and only that one.
        return web.Response(status=204 if request.headers["Authorization"] == f"Bearer {ROTATED}"
                            else 403)  # fmt: skip

    control_plane = web.Application()
    control_plane.router.add_post("/api/agents/register", register)
    control_plane.router.add_post("/api/agents/test-agent/credential/confirm", confirm)
    cache = tmp_path / "cache"
    async with TestServer(control_plane) as cp, aiohttp.ClientSession() as http:
        cp_url = str(cp.make_url("")).rstrip("/")
        server, test_server, url = await start_agent(sim_args(cache, "--control-plane-url", cp_url))
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
            kept = cache / "agent-credential"
            assert kept.read_text().strip() == ISSUED
            assert kept.stat().st_mode & 0o777 == 0o600

            async def status_with(token: str, path: str = "/heartbeat") -> int:
                headers = {"Authorization": f"Bearer {token}"}
                async with http.post(f"{url}{path}", headers=headers) as response:
                    return response.status

            # The enrolment token every agent holds calls no agent once it has a control plane.
            assert await status_with(TOKEN) == 401
            assert await status_with(ISSUED) == 200
            # Whoever holds ISSUED (leaked, say) cannot rotate the agent to a credential of its
            # own: the control plane does not confirm it, and the agent keeps what it had.
            attackers = "lfa_" + "e" * 64
            async with http.post(
                f"{url}/credential", json={"credential": attackers},
                headers={"Authorization": f"Bearer {ISSUED}"},
            ) as response:  # fmt: skip
                assert response.status == 403
                assert (await response.json())["error"]["code"] == "credential_unconfirmed"
            assert kept.read_text().strip() == ISSUED
            assert await status_with(attackers) == 401
            async with http.post(
                f"{url}/credential", json={"credential": ROTATED},
                headers={"Authorization": f"Bearer {ISSUED}"},
            ) as response:  # fmt: skip
                assert response.status == 200
            assert kept.read_text().strip() == ROTATED
            # The previous one still works for calls already under way; a third never did.
            assert (await status_with(ROTATED), await status_with(ISSUED)) == (200, 200)
            assert await status_with("lfa_" + "c" * 64) == 401
        finally:
            await test_server.close()

        # Restarted: it registers with the kept credential, not the enrolment token.
        server, test_server, _ = await start_agent(sim_args(cache, "--control-plane-url", cp_url))
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
        finally:
            await test_server.close()
    assert calls == [f"Bearer {TOKEN}", f"Bearer {ROTATED}"]


async def test_an_agent_whose_credential_the_control_plane_forgot_enrols_again(tmp_path):
    calls: list[str | None] = []

    async def register(request: web.Request) -> web.Response:
        calls.append(request.headers.get("Authorization"))
        if calls[-1] == f"Bearer {ISSUED}":
            return web.json_response({"detail": "Unknown or revoked agent credential"}, status=401)
        body = {"agent_id": "test-agent", "created": True, "credential": ROTATED}
        return web.json_response(body, status=201)

    control_plane = web.Application()
    control_plane.router.add_post("/api/agents/register", register)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "agent-credential").write_text(ISSUED)
    async with TestServer(control_plane) as cp:
        cp_url = str(cp.make_url("")).rstrip("/")
        server, test_server, _ = await start_agent(sim_args(cache, "--control-plane-url", cp_url))
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
        finally:
            await test_server.close()
    assert calls == [f"Bearer {ISSUED}", f"Bearer {TOKEN}"]
    assert (cache / "agent-credential").read_text().strip() == ROTATED


def test_a_rotation_whose_answer_was_lost_can_be_sent_again_with_the_old_credential(tmp_path):
    from nodeagent.credential import Credentials

    kept = Credentials(tmp_path / "credential", TOKEN, standalone=False)
    kept.store(ISSUED)
    kept.store(ROTATED)  # the control plane never heard that it took this one
    assert kept.accepts(ISSUED)
    assert kept.may_rotate(ISSUED)  # so the control plane, still on ISSUED, can try again
    assert kept.accepts(ROTATED)  # the new one presented: the old one's grace starts
    assert not kept.may_rotate(ISSUED)  # from now on only the current one rotates
    assert kept.accepts(ISSUED)  # calls already under way still finish
    kept.forget()
    assert not kept.accepts(ROTATED)
    assert not kept.accepts(ISSUED)


async def test_an_agent_forgets_its_credential_only_when_its_control_plane_revoked_it(tmp_path):
    """Whoever holds the credential (one that leaked) could otherwise lock the agent out."""
    revoked: list[bool] = [False]

    async def register(request: web.Request) -> web.Response:
        return web.json_response({"agent_id": "test-agent", "created": False}, status=200)

    async def confirm(request: web.Request) -> web.Response:
        asked = await request.json()
        ok = asked == {"revocation": True} and revoked[0]
        ok = ok and request.headers["Authorization"] == f"Bearer {ISSUED}"
        return web.Response(status=204 if ok else 403)

    control_plane = web.Application()
    control_plane.router.add_post("/api/agents/register", register)
    control_plane.router.add_post("/api/agents/test-agent/credential/confirm", confirm)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "agent-credential").write_text(ISSUED)
    async with TestServer(control_plane) as cp, aiohttp.ClientSession() as http:
        cp_url = str(cp.make_url("")).rstrip("/")
        server, test_server, url = await start_agent(sim_args(cache, "--control-plane-url", cp_url))
        headers = {"Authorization": f"Bearer {ISSUED}"}
        try:
            await asyncio.wait_for(server.registered.wait(), timeout=10)
            async with http.delete(f"{url}/credential", headers=headers) as response:
                assert response.status == 403
                assert (await response.json())["error"]["code"] == "credential_unconfirmed"
            assert (cache / "agent-credential").read_text().strip() == ISSUED
            revoked[0] = True  # the control plane revoked it
            async with http.delete(f"{url}/credential", headers=headers) as response:
                assert response.status == 200
            assert not (cache / "agent-credential").exists()
        finally:
            await test_server.close()
