"""Compile caches: their keys, their place beside the model and beside the checkpoint, the
round trip through a store, and caches that must be ignored rather than fail a load.
tests/e2e/test_compile_cache_vllm.py does the same with vLLM compiling for real."""

from __future__ import annotations

import shutil

import aiohttp
import pytest

from nodeagent.compilecache import (
    CompileCache,
    cache_key,
    device_kind,
    publish_cache,
    store_uri,
)
from nodeagent.download import DownloadSettings
from nodeagent.store.base import model_files

BASE = ("file:///store/org/m", "rev-1", ["--max-model-len", "512"], "0.32.0", "cpu:x86_64")


@pytest.mark.parametrize("index", range(5))
def test_every_input_of_the_key_changes_it(index):
    changed = list(BASE)
    changed[index] = ["--max-model-len", "1024"] if index == 2 else f"{BASE[index]}-other"
    assert cache_key(*changed) != cache_key(*BASE)
    assert cache_key(*BASE) == cache_key(*BASE)


def test_device_kinds_name_the_gpu_or_the_cpu_and_its_instruction_set():
    assert device_kind(["NVIDIA H100 80GB HBM3"]) == "cuda:NVIDIA H100 80GB HBM3"
    cpu = device_kind([])
    assert cpu.startswith("cpu:")
    assert cpu.count(":") >= 2


def test_the_cache_is_published_beside_the_checkpoint_never_inside():
    assert store_uri("file:///s/org/m", "k") == "file:///s/org/m.llmfleet-compile/k"
    assert store_uri("azure://models/org/m/", "k") == "azure://models/org/m.llmfleet-compile/k"


def test_a_model_s_files_leave_out_its_compile_caches(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    cache = tmp_path / ".llmfleet-compile" / "k" / "torch_compile_cache"
    cache.mkdir(parents=True)
    (cache / "graph.bin").write_bytes(b"x")
    assert [path.name for path in model_files(tmp_path)] == ["config.json"]


def _compiled(model_dir, key: str, source: str) -> CompileCache:
    cache = CompileCache.for_model(model_dir, source, key)
    compiled = cache.root / "torch_compile_cache" / "rank_0"
    compiled.mkdir(parents=True)
    (compiled / "artifact.bin").write_bytes(bytes(range(256)) * 64)
    (cache.root / "modelinfos").mkdir()
    (cache.root / "modelinfos" / "llama.json").write_text('{"hash": "h"}')
    return cache


async def _fetch(cache: CompileCache) -> None:
    async with aiohttp.ClientSession() as session:
        await cache.fetch(session, {}, DownloadSettings(), 30)


async def test_a_published_cache_reaches_an_agent_on_the_same_kind_of_device(tmp_path):
    source = (tmp_path / "store" / "org" / "m").as_uri()
    first = _compiled(tmp_path / "agent-a" / "m", "k1", source)
    assert first.origin == "new"  # as the first start saw it: then it compiled
    assert first.publishable
    restarted = CompileCache.for_model(tmp_path / "agent-a" / "m", source, "k1")
    assert (restarted.origin, restarted.publishable) == ("local", False)  # its own, kept
    publish_cache(first, {})
    second = CompileCache.for_model(tmp_path / "agent-b" / "m", source, "k1")
    assert second.origin == "new"
    await _fetch(second)
    assert (second.origin, second.note) == ("store", "")
    assert (second.root / "torch_compile_cache" / "rank_0" / "artifact.bin").read_bytes() == (
        first.root / "torch_compile_cache" / "rank_0" / "artifact.bin"
    ).read_bytes()
    assert not second.publishable  # it came from the store: nothing to give back
    other_key = CompileCache.for_model(tmp_path / "agent-c" / "m", source, "k2")
    await _fetch(other_key)
    assert (other_key.origin, other_key.note) == ("new", "")  # none for that key: compile


async def test_a_corrupted_published_cache_is_ignored_and_leaves_nothing(tmp_path):
    source = (tmp_path / "store" / "org" / "m").as_uri()
    first = _compiled(tmp_path / "agent-a" / "m", "k1", source)
    publish_cache(first, {})
    published = tmp_path / "store" / "org" / "m.llmfleet-compile" / "k1"
    artifact = published / "torch_compile_cache" / "rank_0" / "artifact.bin"
    data = bytearray(artifact.read_bytes())
    data[100] ^= 0xFF
    artifact.write_bytes(bytes(data))
    second = CompileCache.for_model(tmp_path / "agent-b" / "m", source, "k1")
    await _fetch(second)
    assert second.origin == "new"
    assert second.note.startswith("the published compile cache was ignored: ")
    assert "artifact.bin" in second.note
    assert not second.root.exists()
    assert list((tmp_path / "agent-b" / "m" / ".llmfleet-compile").iterdir()) == []


def test_an_eager_engine_s_cache_is_not_worth_publishing_and_a_discarded_one_is_gone(tmp_path):
    cache = CompileCache.for_model(tmp_path / "m", "file:///s/m", "k")
    (cache.root / "modelinfos").mkdir(parents=True)
    (cache.root / "modelinfos" / "llama.json").write_text("{}")
    assert not cache.publishable  # --enforce-eager compiles nothing
    cache.discard("engine_exited: engine exited during start-up")
    assert (cache.origin, cache.root.exists()) == ("discarded", False)
    assert (
        cache.note == "the compile cache was deleted: engine_exited: engine exited during start-up"
    )


async def test_a_manifest_naming_a_compile_cache_plants_nothing(tmp_path, tiny_model):
    """A store's manifest that lists `.llmfleet-compile/...` files would have the agent put a
    compile cache (code the engine runs) beside the model, even with sharing off."""
    from nodeagent.store.base import MANIFEST_NAME, Manifest, ManifestFile, digests_of
    from tests.nodeagent.conftest import TOKEN, sim_args, start_agent

    store = tmp_path / "store" / "org" / "tiny"
    shutil.copytree(tiny_model, store)
    planted = store / ".llmfleet-compile" / "key" / "inductor.py"
    planted.parent.mkdir(parents=True)
    planted.write_text("import os; os.system('id')\n")
    honest = Manifest.of_directory(store)
    sha256, blake3 = digests_of(planted)
    rigged = ManifestFile(
        ".llmfleet-compile/key/inductor.py", planted.stat().st_size, sha256, blake3
    )
    (store / MANIFEST_NAME).write_text(Manifest((*honest.files, rigged)).to_json())

    _, test_server, url = await start_agent(
        sim_args(tmp_path / "cache", "--share-compile-cache", "false")
    )
    try:
        body = {"model_id": "org/tiny", "source": store.as_uri()}
        async with (
            aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as http,
            http.post(f"{url}/load_model", json=body) as response,
        ):
            error = (await response.json())["error"]
        assert error["code"] == "bad_manifest"
        assert not list((tmp_path / "cache").rglob("inductor.py"))
    finally:
        await test_server.close()


def test_a_published_compile_cache_holds_no_link_the_engine_planted(tmp_path):
    """An engine runs code the agent does not control and writes its compile cache: a link
    there (to the agent's credential) must not be read by the agent, which publishes as the
    agent's user."""
    from nodeagent.compilecache import copy_regular_files

    secret = tmp_path / "agent-credential"
    secret.write_text("lfa_secret")
    cache = tmp_path / "cache"
    (cache / "torch_compile_cache" / "abc").mkdir(parents=True)
    (cache / "torch_compile_cache" / "abc" / "graph.py").write_text("compiled")
    (cache / "torch_compile_cache" / "stolen").symlink_to(secret)
    (cache / "linked-dir").symlink_to(tmp_path)
    staging = tmp_path / "staging"
    assert copy_regular_files(cache, staging) == 1
    copied = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
    assert copied == ["torch_compile_cache/abc/graph.py"]
