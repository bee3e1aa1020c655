"""The engine-argument policy (nodeagent.engineargs), and the agent holding every load to it:
an older control plane, or anyone with the agent's credential, may send anything."""

from __future__ import annotations

from pathlib import Path

import pytest

from nodeagent import engineargs
from nodeagent.engines.vllm import vllm_argv
from tests.nodeagent.conftest import sim_args, start_agent


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["--max-model-len", "512", "--dtype", "float32", "--enforce-eager"],
        ["--kv-cache-memory-bytes", "64M", "--max-num-seqs", "8"],
        ["--max_model_len=4096", "--no-enable-prefix-caching", "--seed", "-1"],
        ["--runner", "pooling", "--enable-lora", "--max-loras", "4", "--max-lora-rank", "16"],
        ["--distributed-executor-backend", "mp", "--tensor-parallel-size", "2"],
        ["--override-generation-config", '{"temperature": 0.5}'],
        ["--cudagraph-capture-sizes", "1", "2", "4", "--enforce-eager"],
    ],
)
def test_tuning_flags_are_allowed(args):
    assert engineargs.problems(args) == []


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--host", "0.0.0.0"], "--host is not allowed: it would bind"),  # noqa: S104
        (["--port=9000"], "--port is not allowed"),
        (["--api-key", "x"], "--api-key is not allowed"),
        (["--trust-remote-code"], "--trust-remote-code is not allowed: it runs code"),
        (["--trust_remote_code"], "--trust-remote-code is not allowed"),
        (["--worker-cls", "evil.Worker"], "--worker-cls is not allowed: it runs code"),
        (["--compilation-config.backend", "evil.f"], "give the whole flag as JSON"),
        (["--chat-template", "/etc/shadow"], "--chat-template is not allowed"),
        (["--config", "flags.yaml"], "--config is not allowed: it reads or writes a path"),
        (["--download-dir", "/"], "--download-dir is not allowed"),
        (["--served-model-name", "other"], "the agent sets it itself"),
        (["--made-up-flag"], "not on the allow-list"),
        (["-tp", "2"], "short flag"),
        (["float32"], "a value with no flag before it"),
        (["--dtype"], "--dtype needs a value"),
        (["--dtype", "--host", "0.0.0.0"], "--dtype needs a value"),  # noqa: S104
        (["--enforce-eager=false"], "--enforce-eager takes no value"),
        (["--distributed-executor-backend", "external_launcher"], "takes one of mp, uni"),
        (["--distributed-executor-backend=ray"], "takes one of mp, uni"),
        (["--dtype", "float32\n--host"], "control character"),
        ([3], "is not a string"),
    ],
)
def test_flags_outside_the_policy_are_refused_with_the_reason(args, says):
    found = engineargs.problems(args)
    assert found
    assert says in " ".join(found)


def test_every_refused_flag_is_named_at_once():
    with pytest.raises(engineargs.EngineArgsRefused) as refused:
        engineargs.check(["--host", "0.0.0.0", "--trust-remote-code", "--dtype", "half"])  # noqa: S104
    assert len(refused.value.problems) == 2


def test_an_operator_s_memory_share_is_kept_however_it_is_spelled():
    for given in (["--gpu_memory_utilization", "0.5"], ["--gpu-memory-utilization=0.5"]):
        argv = vllm_argv("python", Path("/m"), "m", 1, given, gpu=True, gpu_memory_share=0.9)
        assert "0.9" not in argv


def test_the_agent_s_own_flags_come_last_so_they_win():
    argv = vllm_argv(
        "python", Path("/m"), "org/m", 8123, ["--dtype", "float32"], gpu=False,
        gpu_memory_share=0.9, trust_remote_code=True,
    )  # fmt: skip
    assert argv.index("--dtype") < argv.index("--host")
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--port") + 1] == "8123"
    assert argv[-1] == "--trust-remote-code"


def load(tiny_model: Path, **engine: object) -> dict:
    return {"model_id": "org/tiny", "source": tiny_model.as_uri(), "engine": engine}


async def post(url: str, body: dict) -> tuple[int, dict]:
    import aiohttp

    headers = {"Authorization": "Bearer agent-test-token"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.post(f"{url}/load_model", json=body) as response,
    ):
        return response.status, await response.json()


async def test_the_agent_refuses_a_load_with_flags_outside_the_policy(tmp_path, tiny_model):
    server, test_server, url = await start_agent(sim_args(tmp_path / "cache"))
    try:
        bad = load(tiny_model, args=["--host", "0.0.0.0", "--max-model-len", "512"])  # noqa: S104
        status, body = await post(url, bad)
        assert (status, body["error"]["code"]) == (400, "engine_args_refused")
        assert "--host is not allowed" in body["error"]["message"]
        assert "org/tiny" not in server.registry.slots  # nothing was started or downloaded
    finally:
        await test_server.close()


async def test_remote_code_runs_only_where_the_agent_s_operator_allows_it(tmp_path, tiny_model):
    _, test_server, url = await start_agent(sim_args(tmp_path / "cache"))
    try:
        status, body = await post(url, load(tiny_model, trust_remote_code=True))
        assert (status, body["error"]["code"]) == (403, "remote_code_refused")
    finally:
        await test_server.close()
    _, test_server, url = await start_agent(
        sim_args(tmp_path / "cache2", "--allow-remote-code", "true")
    )
    try:
        status, body = await post(url, load(tiny_model, trust_remote_code=True))
        assert status == 200, body
    finally:
        await test_server.close()
