"""A model published in several stores: the agent's fetch tries its sources in order (the
nearest first) and falls back when one is down, against real emulators killed for real."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import aiohttp
import pytest

from nodeagent.cache import ModelCache
from nodeagent.download import DownloadProgress, DownloadSettings
from nodeagent.fetch import Fetched, fetch_model
from nodeagent.protocol import SourceSpec, order_sources
from nodeagent.store import StoreError, open_store, read_manifest
from tests.clouds import GcsEmulator, Moto
from tests.store.conftest import MIB, digests, quiet_publish, when_progress


async def fetch_from(
    sources: list[str],
    environ: dict[str, str],
    cache_dir: Path,
    progress: DownloadProgress | None = None,
    settings: DownloadSettings | None = None,
    failover_seconds: float | None = 20,
    manifest: str = "",
) -> Fetched:
    cache = ModelCache(cache_dir)

    async def room(needed: int) -> None:
        return None

    async with aiohttp.ClientSession(skip_auto_headers={"Accept-Encoding"}) as session:
        deadline = asyncio.get_running_loop().time() + 60
        return await fetch_model(
            cache, sources, lambda uri: open_store(uri, session, environ), "org/mirrored", "",
            progress or DownloadProgress(), settings or DownloadSettings(), deadline, room,
            failover_seconds=failover_seconds, manifest=manifest,
        )  # fmt: skip


@pytest.fixture
def dead_moto(tmp_path, moto, gcs, azurite):
    """An S3 that was there and is gone: moto started, then killed (after the session's own
    emulators, so none of them can be listening on its port)."""
    server = Moto(tmp_path / "dead-moto", auth=False).start()
    server.kill()
    return server


@pytest.fixture
def dead_gcs(tmp_path, moto, gcs, azurite):
    server = GcsEmulator(tmp_path / "dead-gcs").start()
    server.kill()
    return server


@pytest.mark.parametrize("second", ["azure", "s3", "gs"])
async def test_a_model_whose_first_source_is_down_is_served_from_the_second(
    second, request, dead_moto, dead_gcs, checkpoint, tmp_path
):
    live = request.getfixturevalue({"azure": "azurite", "s3": "moto", "gs": "gcs"}[second])
    dead, dead_uri = (dead_gcs, "gs://models/mirrored") if second == "s3" else (
        dead_moto, "s3://models/mirrored"
    )  # fmt: skip
    live_uri = f"{second}://models/mirrored-{tmp_path.name}"
    quiet_publish(checkpoint, live_uri, live.environ())
    environ = {**dead.environ(), **live.environ()}

    fetched = await fetch_from([dead_uri, live_uri], environ, tmp_path / "cache")

    assert fetched.source == live_uri
    assert fetched.result is not None
    assert fetched.result.resumed_bytes == 0
    assert digests(fetched.cached.directory) == digests(checkpoint)
    assert fetched.cached.source == live_uri
    # The cached copy serves the next load whichever source is listed first.
    again = await fetch_from([dead_uri, live_uri], environ, tmp_path / "cache")
    assert (again.result, again.source) == (None, live_uri)


async def test_a_source_holding_another_model_is_refused_and_the_next_serves(
    moto, gcs, checkpoint, tmp_path
):
    other = tmp_path / "other"
    shutil.copytree(checkpoint, other)
    (other / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}')
    stale, right = f"gs://models/stale-{tmp_path.name}", f"s3://models/right-{tmp_path.name}"
    quiet_publish(other, stale, gcs.environ())
    quiet_publish(checkpoint, right, moto.environ())
    registered = read_manifest(right, moto.environ()).identity
    environ = {**gcs.environ(), **moto.environ()}

    fetched = await fetch_from([stale, right], environ, tmp_path / "cache", manifest=registered)
    assert fetched.source == right
    assert digests(fetched.cached.directory) == digests(checkpoint)
    with pytest.raises(StoreError) as raised:
        await fetch_from([stale], environ, tmp_path / "alone", manifest=registered)
    assert (raised.value.code, raised.value.status) == ("manifest_mismatch", 409)
    assert f"{stale} holds another model than the one registered" in str(raised.value)


async def test_every_source_failing_names_each(dead_moto, dead_gcs, tmp_path):
    environ = {**dead_moto.environ(), **dead_gcs.environ()}
    with pytest.raises(StoreError) as raised:
        await fetch_from(["s3://models/a", "gs://models/b"], environ, tmp_path / "cache")
    assert raised.value.code == "store_unreachable"
    assert "s3://models/a: " in str(raised.value)
    assert "gs://models/b: " in str(raised.value)


async def test_a_source_that_dies_mid_download_hands_over_and_the_next_resumes(
    disk_azurite, moto, checkpoint, tmp_path
):
    first, second = "azure://models/handover", f"s3://models/handover-{tmp_path.name}"
    quiet_publish(checkpoint, first, disk_azurite.environ())
    quiet_publish(checkpoint, second, moto.environ())
    environ = {**disk_azurite.environ(), **moto.environ()}
    progress = DownloadProgress()
    slow = DownloadSettings(concurrency=2, range_bytes=1 * MIB, bandwidth_limit=20e6)
    task = asyncio.create_task(
        fetch_from([first, second], environ, tmp_path / "cache", progress, slow, 1.0)
    )
    await when_progress(progress, 0.5)
    disk_azurite.kill()
    fetched = await task
    assert fetched.source == second
    assert fetched.result is not None
    total = sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file())
    # The same manifest in both stores: what the first source fetched is kept (all but the
    # two 1 MiB ranges that were in flight, of 40 MiB).
    assert fetched.result.resumed_bytes >= 0.4 * total
    assert fetched.result.fetched_bytes == total - fetched.result.resumed_bytes
    assert digests(fetched.cached.directory) == digests(checkpoint)


def test_sources_are_tried_nearest_first():
    azure = SourceSpec("azure://m/x", {"cloud": "azure", "region": "westeurope"})
    s3_east = SourceSpec("s3://m/x", {"cloud": "aws", "region": "us-east-1"})
    s3_west = SourceSpec("s3://m-west/x", {"cloud": "aws", "region": "us-west-2", "zone": "b"})
    plain = SourceSpec("file:///srv/x")
    catalog = [azure, s3_east, s3_west, plain]

    def uris(labels: dict[str, str]) -> list[str]:
        return [source.uri for source in order_sources(catalog, labels)]

    assert uris({}) == [s.uri for s in catalog]  # no labels: catalog order
    assert uris({"cloud": "aws", "region": "us-west-2", "zone": "b"})[:2] == [
        "s3://m-west/x", "s3://m/x",
    ]  # fmt: skip
    assert uris({"cloud": "aws", "region": "us-east-1"})[:2] == ["s3://m/x", "s3://m-west/x"]
    assert uris({"cloud": "gcp"}) == [s.uri for s in catalog]
    assert uris({"region": "westeurope", "zone": "local"})[0] == "azure://m/x"


def test_a_zone_of_the_same_name_in_another_region_is_not_near():
    # Azure names its zones 1, 2 and 3 in every region.
    far = SourceSpec("azure://far/x", {"cloud": "azure", "region": "westeurope", "zone": "1"})
    near = SourceSpec("azure://near/x", {"cloud": "azure", "region": "eastus", "zone": "2"})
    labels = {"cloud": "azure", "region": "eastus", "zone": "1"}
    assert [s.uri for s in order_sources([far, near], labels)] == [near.uri, far.uri]
