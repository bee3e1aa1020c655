from __future__ import annotations

import asyncio
import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from nodeagent.download import DownloadProgress, DownloadResult, DownloadSettings, download
from nodeagent.store import open_store
from nodeagent.store.base import RemoteFile
from nodeagent.store.publish import publish
from tests.azurite import Azurite

MIB = 1024 * 1024


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A synthetic 40 MiB checkpoint: two weight files and a config, in a subfolder too."""
    directory = tmp_path_factory.mktemp("checkpoint")
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    (directory / "model-00001-of-00002.safetensors").write_bytes(os.urandom(24 * MIB))
    (directory / "sub").mkdir()
    (directory / "sub" / "model-00002-of-00002.safetensors").write_bytes(os.urandom(16 * MIB + 123))
    return directory


def digests(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(directory.rglob("*"))
        if path.is_file()
        and not path.name.startswith(".llmfleet")
        and path.name != "llmfleet-manifest.json"
    }


def quiet_publish(local: Path, uri: str, environ: dict[str, str]) -> None:
    publish(local, uri, environ, stream=io.StringIO())


async def fetch(
    uri: str,
    environ: dict[str, str],
    staging: Path,
    settings: DownloadSettings | None = None,
    progress: DownloadProgress | None = None,
    deadline_seconds: float = 60,
) -> DownloadResult:
    async with aiohttp.ClientSession(skip_auto_headers={"Accept-Encoding"}) as session:
        store = open_store(uri, session, environ)
        files = await store.listing()
        deadline = asyncio.get_running_loop().time() + deadline_seconds
        return await download(
            store,
            files,
            staging,
            settings or DownloadSettings(),
            progress or DownloadProgress(),
            deadline,
        )


async def when_progress(progress: DownloadProgress, share: float) -> None:
    """Return once the download has done `share` of its bytes (polls: progress has no events)."""
    while not progress.total or progress.done < share * progress.total:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def listing(uri: str, environ: dict[str, str] | None = None) -> list[RemoteFile]:
    async with aiohttp.ClientSession() as session:
        return await open_store(uri, session, environ or {}).listing()


@pytest.fixture
def disk_azurite(tmp_path: Path) -> Iterator[Azurite]:
    """An Azurite of this test's own that keeps blobs on disk, so it can be restarted."""
    server = Azurite(tmp_path / "azurite-work", location=tmp_path / "azurite-data").start()
    yield server
    server.kill()
