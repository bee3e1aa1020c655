"""Engines get a minimal environment (never the enrolment token or store credentials) and,
with AGENT_ENGINE_USER, a user of their own that cannot read the agent's credential file."""

from __future__ import annotations

import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from nodeagent.engines.identity import engine_environment
from nodeagent.server import AgentServer
from tests.nodeagent.conftest import TOKEN, start_agent
from tests.support import wait_for

SECRETS = {
    "AGENT_TOKEN": "fleet-enrolment-token",
    "AWS_SECRET_ACCESS_KEY": "aws-secret",
    "AWS_ACCESS_KEY_ID": "aws-id",
    "AZURE_STORAGE_CONNECTION_STRING": "AccountKey=azure-secret",
    "GOOGLE_APPLICATION_CREDENTIALS": "/etc/gcs.json",
    "HF_TOKEN": "hf-secret",
    "VLLM_API_KEY": "would-lock-the-agent-out",
    "SECRET_KEY": "django-secret",
    "DATABASE_URL": "postgres://user:password@db/fleet",
}
HOST = {
    "PATH": "/usr/bin:/bin",
    "LANG": "C.UTF-8",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "CUDA_VISIBLE_DEVICES": "0,1",
    "NCCL_DEBUG": "WARN",
    "OMP_NUM_THREADS": "2",
    "HF_HUB_OFFLINE": "1",
}


def test_the_engine_environment_keeps_how_to_run_vllm_and_no_secret():
    kept = engine_environment({**SECRETS, **HOST}, home=Path("/cache/engine-home"))
    assert kept == {**HOST, "HOME": "/cache/engine-home"}


def test_the_operator_names_what_else_engines_get():
    kept = engine_environment(
        {**SECRETS, "HTTPS_PROXY": "http://proxy:3128"}, ["HTTPS_PROXY", "HF_TOKEN"]
    )
    assert kept == {"HTTPS_PROXY": "http://proxy:3128", "HF_TOKEN": "hf-secret"}


@pytest.fixture
def fake_engine() -> Iterator[Path]:
    """An "engine interpreter" anyone may run: a script that runs fake_vllm.py with the
    host's python3, outside the tests' private temporary directories."""
    where = Path(tempfile.mkdtemp(prefix="llmfleet-fake-engine-", dir="/tmp"))
    where.chmod(0o755)
    script = where / "fake_vllm.py"
    shutil.copy(Path(__file__).with_name("fake_vllm.py"), script)
    python = where / "python"
    python.write_text(f'#!/bin/sh\nshift 2\nexec /usr/bin/python3 -S {script} "$@"\n')
    python.chmod(0o755)
    reports = where / "reports"
    reports.mkdir()
    reports.chmod(0o777)
    yield where
    shutil.rmtree(where, ignore_errors=True)


async def load_and_report(
    tmp_path: Path, tiny_model: Path, fake_engine: Path, monkeypatch, *extra: str
) -> dict:
    """Start an agent (its own process environment full of secrets), load a model onto the
    fake engine, and return what the engine saw."""
    cache = tmp_path / "cache"
    cache.mkdir()
    credential = cache / "agent-credential"
    credential.write_text("lfa_" + "0" * 64 + "\n")
    credential.chmod(0o600)
    report = fake_engine / "reports" / "engine.json"
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("LLMFLEET_TEST_REPORT", str(report))
    monkeypatch.setenv("LLMFLEET_TEST_CREDENTIAL", str(credential))
    args = [
        "--token", TOKEN, "--cache-dir", str(cache), "--engine", "vllm",
        "--engine-python", str(fake_engine / "python"), "--standby-engines", "0",
        "--engine-env", "LLMFLEET_TEST_REPORT,LLMFLEET_TEST_CREDENTIAL", *extra,
    ]  # fmt: skip
    server, test_server, url = await start_agent(args)
    assert isinstance(server, AgentServer)
    try:
        body = {"model_id": "org/tiny", "source": tiny_model.as_uri()}
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            http.post(f"{url}/load_model", json=body) as response,
        ):
            assert response.status == 200, await response.text()
        wait_for(report.exists, 10, "the engine's report")
        return json.loads(report.read_text())
    finally:
        await test_server.close()


async def test_an_engine_sees_no_secret_of_the_agent(
    tmp_path, tiny_model, fake_engine, monkeypatch
):
    seen = await load_and_report(tmp_path, tiny_model, fake_engine, monkeypatch)
    leaked = {name for name, value in seen["environ"].items() if value in SECRETS.values()}
    assert leaked == set()
    assert not any(name.startswith("AGENT_") for name in seen["environ"])
    assert seen["environ"]["HOME"] == str(tmp_path / "cache" / "engine-home")
    # The agent's own flags are the engine's last word on where it listens.
    argv = seen["argv"]
    assert argv[argv.index("--host") + 1] == "127.0.0.1"


@pytest.mark.skipif(os.geteuid() != 0, reason="running engines as another user needs root")
async def test_an_engine_user_cannot_read_the_agent_s_credential_or_environment(
    tmp_path, tiny_model, fake_engine, monkeypatch
):
    # The engine user must reach the cache (the model's files); the credential stays 0600.
    for directory in (tmp_path, *tmp_path.parents):
        if directory == Path("/"):
            break
        directory.chmod(directory.stat().st_mode | stat.S_IXOTH)
    seen = await load_and_report(
        tmp_path, tiny_model, fake_engine, monkeypatch, "--engine-user", "nobody"
    )
    assert seen["uid"] == 65534
    assert seen["read_credential"] is False
    assert seen["read_agent_environ"] is False


async def test_a_user_that_does_not_exist_stops_the_agent_at_start(tmp_path):
    from nodeagent.config import parse_config

    with pytest.raises(SystemExit):
        parse_config(["--token", TOKEN, "--engine-user", "no-such-user-here"], environ={})
