"""The stores side of bench/download.py: every store llmfleet reads (Azure Blob through
Azurite, S3 through moto, GCS through gcp-storage-emulator), each downloaded by llmfleet's
own downloader and by obstore (one Rust core for S3, GCS and Azure) on the same data.

Both clients do the same work: 16 MiB ranges, 8 in flight, written into preallocated files
and verified with BLAKE3 in file order. obstore hands each range over as a new buffer of its
own, which is written and hashed from there; llmfleet's reads into reused buffers.
"""

from __future__ import annotations

import asyncio
import io
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp

from nodeagent.download import DownloadProgress, DownloadSettings, download
from nodeagent.download_write import write_all
from nodeagent.store import RemoteFile, open_store
from nodeagent.store.azure import AZURITE_ACCOUNT, AZURITE_KEY, parse_azure_uri
from nodeagent.store.base import new_blake3
from nodeagent.store.gcs import parse_gcs_uri
from nodeagent.store.publish import publish
from nodeagent.store.s3 import parse_s3_uri
from tests.azurite import Azurite
from tests.clouds import BUCKET, GcsEmulator, Moto

if TYPE_CHECKING:
    from obstore.store import ClientConfig

STORES = ("azure", "s3", "gs")


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def start(kind: str, work: Path) -> Any:
    """The emulator of `kind`, started: Azurite in memory, moto without IAM checks (the
    client still signs every range), the GCS emulator in memory."""
    if kind == "azure":
        return Azurite(work / "azurite").start()
    if kind == "s3":
        return Moto(work / "moto", auth=False).start()
    return GcsEmulator(work / "gcs").start()


def uri_of(kind: str) -> str:
    return f"{kind}://{BUCKET if kind != 'azure' else 'bench'}/model"


def publish_to(kind: str, server: Any, model: Path) -> dict[str, str]:
    environ = dict(server.environ())
    publish(model, uri_of(kind), environ, stream=io.StringIO())
    return environ


async def listing(uri: str, environ: dict[str, str]) -> list[RemoteFile]:
    async with aiohttp.ClientSession() as session:
        return await open_store(uri, session, environ).listing()


async def ours(
    uri: str, environ: dict[str, str], target: Path, settings: DownloadSettings
) -> tuple[float, float]:
    """(seconds, CPU seconds) of the download itself: the store's set-up and listing are
    not counted, for either client."""
    async with aiohttp.ClientSession(skip_auto_headers={"Accept-Encoding"}) as session:
        store = open_store(uri, session, environ)
        files = await store.listing()
        started, cpu = time.perf_counter(), cpu_seconds()
        deadline = asyncio.get_running_loop().time() + 600
        await download(store, files, target, settings, DownloadProgress(), deadline)
        return time.perf_counter() - started, cpu_seconds() - cpu


def obstore_for(uri: str, environ: dict[str, str]) -> tuple[Any, str]:
    """obstore's store for `uri` configured from the same environment, and the key prefix."""
    from obstore.store import AzureStore, GCSStore, S3Store

    http: ClientConfig = {"allow_http": True}
    if uri.startswith("s3://"):
        bucket, prefix = parse_s3_uri(uri)
        store: Any = S3Store(
            bucket, endpoint=environ["AWS_ENDPOINT_URL_S3"],
            access_key_id=environ["AWS_ACCESS_KEY_ID"],
            secret_access_key=environ["AWS_SECRET_ACCESS_KEY"], region=environ["AWS_REGION"],
            virtual_hosted_style_request=False, client_options=http,
        )  # fmt: skip
    elif uri.startswith("gs://"):
        bucket, prefix = parse_gcs_uri(uri)
        store = GCSStore(
            bucket, base_url=environ["STORAGE_EMULATOR_HOST"], skip_signature=True,
            client_options=http,
        )  # fmt: skip
    else:
        container, prefix = parse_azure_uri(uri)
        account_url = environ["AZURE_STORAGE_CONNECTION_STRING"].split("BlobEndpoint=")[1]
        store = AzureStore(
            container, account_name=AZURITE_ACCOUNT, access_key=AZURITE_KEY,
            endpoint=account_url.rstrip(";"), client_options=http,
        )  # fmt: skip
    return store, prefix


class _InOrder:
    """Hashes a file's ranges in order as they arrive out of order (as the downloader does)."""

    def __init__(self) -> None:
        self.hash, self.next = new_blake3(), 0
        self.waiting: dict[int, Any] = {}
        self.lock = asyncio.Lock()

    async def add(self, start: int, data: Any) -> None:
        self.waiting[start] = data
        async with self.lock:
            while self.next in self.waiting:
                piece = self.waiting.pop(self.next)
                await asyncio.to_thread(self.hash.update, piece)
                self.next += len(piece)


async def with_obstore(
    uri: str, environ: dict[str, str], target: Path, settings: DownloadSettings
) -> tuple[float, float]:
    import obstore

    files = await listing(uri, environ)
    store, prefix = obstore_for(uri, environ)
    started, cpu = time.perf_counter(), cpu_seconds()
    gate = asyncio.Semaphore(settings.concurrency)
    hashes = {file.path: _InOrder() for file in files}
    descriptors: dict[str, int] = {}
    for file in files:
        path = target / file.path
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptors[file.path] = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        os.ftruncate(descriptors[file.path], file.size)

    async def fetch(file: RemoteFile, start: int, end: int) -> None:
        async with gate:
            data = await obstore.get_range_async(
                store, f"{prefix}/{file.path}", start=start, end=end
            )
        view = memoryview(data)
        await asyncio.to_thread(write_all, descriptors[file.path], view, start)
        await hashes[file.path].add(start, view)

    try:
        await asyncio.gather(*(
            fetch(file, offset, min(offset + settings.range_bytes, file.size))
            for file in files for offset in range(0, file.size, settings.range_bytes)
        ))  # fmt: skip
    finally:
        for descriptor in descriptors.values():
            os.close(descriptor)
    seconds, cpu = time.perf_counter() - started, cpu_seconds() - cpu
    for file in files:
        if file.blake3 and hashes[file.path].hash.hexdigest() != file.blake3:
            raise SystemExit(f"obstore: BLAKE3 mismatch in {file.path}")
    return seconds, cpu


def measure_here_store(method: str, uri: str, environ: dict[str, str], target: Path,
                 settings: DownloadSettings) -> tuple[float, float]:  # fmt: skip
    """(seconds, CPU seconds) of one client's download."""
    run: Callable[..., Any] = ours if method == "ours" else with_obstore
    seconds, cpu = asyncio.run(run(uri, environ, target, settings))
    return float(seconds), float(cpu)
