"""Download speed of a 1 GiB model from Azurite: llmfleet's downloader, the Azure SDK, the wire;
then every store (Azure, S3, GCS emulators) with llmfleet's downloader beside obstore.

    .venv/bin/python bench/download.py [--size-mib 1024] [--files 4] [--store-size-mib 256]
    .venv/bin/python bench/download.py --stores-only

Publishes a synthetic model (random bytes) to an in-memory Azurite, then in the
same run measures MB/s for (a) llmfleet's downloader, CPU seconds of its process
counted, verifying with BLAKE3 (the manifest as `publish` writes it) and then the
same bytes with sha256 (the manifest rewritten without BLAKE3, as older ones), then
with BLAKE3 again but written through the page cache (`direct_io` off), (b) the
Azure SDK's `download_blob().readinto()`
with default settings, and (c) the machine's ceiling: the same bytes fetched
over loopback HTTP by curl from a plain static server (`python -m http.server`).
Ends with one RESULT line (`cpu_s_per_gib` is BLAKE3's, `cpu_s_per_gib_sha256`
beside it). Needs `make azurite` (npm) and curl.

The stores part (bench/stores.py) publishes a smaller model (`--store-size-mib`, in
16 MiB files) to Azurite, moto and gcp-storage-emulator and downloads it from each with
llmfleet's downloader and with obstore, each in a fresh process; its RESULT line has
MB/s and CPU seconds per GiB for each pair.

Each method runs in a fresh process, after `sync` and (as root) dropping the
page cache: on these VMs a process's writes slow to about a third once it has
written about 1 GiB, whatever the write pattern, so a method measured in a
process that already wrote would be handicapped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import io
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from azure.storage.blob import BlobServiceClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stores import STORES, measure_here_store, publish_to, start, uri_of  # noqa: E402

from nodeagent.download import DownloadProgress, DownloadSettings, download  # noqa: E402
from nodeagent.store import open_store  # noqa: E402
from nodeagent.store.base import MANIFEST_NAME  # noqa: E402
from nodeagent.store.publish import publish  # noqa: E402
from tests.azurite import Azurite  # noqa: E402
from tests.support import free_port, wait_for  # noqa: E402

MIB = 1024 * 1024


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_model(directory: Path, size_mib: int, files: int) -> dict[str, str]:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    digests = {}
    for number in range(files):
        name = f"model-{number + 1:05d}-of-{files:05d}.safetensors"
        data = os.urandom(size_mib * MIB // files)
        (directory / name).write_bytes(data)
        digests[name] = hashlib.sha256(data).hexdigest()
    return digests


async def ours(
    uri: str, environ: dict[str, str], staging: Path, settings: DownloadSettings
) -> tuple[float, float, float]:
    """(seconds, cpu seconds, seconds of which transfer) for llmfleet's downloader."""
    async with aiohttp.ClientSession(skip_auto_headers={"Accept-Encoding"}) as session:
        store = open_store(uri, session, environ)
        files = await store.listing()
        cpu, started = cpu_seconds(), time.perf_counter()
        progress = DownloadProgress()
        result = await download(
            store,
            files,
            staging,
            settings,
            progress,
            asyncio.get_running_loop().time() + 600,
        )
        return time.perf_counter() - started, cpu_seconds() - cpu, result.verify_seconds


def sdk(connection_string: str, prefix: str, names: list[str], target: Path) -> float:
    client = BlobServiceClient.from_connection_string(connection_string)
    container = client.get_container_client("bench")
    target.mkdir()
    started = time.perf_counter()
    for name in names:
        with (target / name).open("wb") as handle:
            container.download_blob(f"{prefix}/{name}").readinto(handle)
    return time.perf_counter() - started


def fresh_start() -> None:
    """Flush dirty pages and, where allowed, drop the page cache: every method starts alike."""
    os.sync()
    with contextlib.suppress(OSError):
        Path("/proc/sys/vm/drop_caches").write_text("3\n")


def measure(
    method: str,
    connection_string: str,
    target: Path,
    names: list[str],
    tuning: list[str],
    prefix: str = "model",
) -> dict[str, float]:
    """Run one method in a fresh process; its wall seconds, CPU seconds and verify seconds."""
    fresh_start()
    argv = [sys.executable, __file__, "--measure", method, "--connection-string", connection_string,
            "--target", str(target), "--names", ",".join(names), "--prefix", prefix,
            *tuning]  # fmt: skip
    output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


def measure_here(
    method: str, connection_string: str, target: Path, names: list[str],
    settings: DownloadSettings, prefix: str,
) -> None:  # fmt: skip
    environ = {"AZURE_STORAGE_CONNECTION_STRING": connection_string}
    cpu = cpu_seconds()
    if method == "ours":
        seconds, _, verify_seconds = asyncio.run(
            ours(f"azure://bench/{prefix}", environ, target, settings)
        )
    else:
        seconds, verify_seconds = sdk(connection_string, "model", names, target), 0.0
    print(
        json.dumps(
            {"seconds": seconds, "cpu": cpu_seconds() - cpu, "verify_seconds": verify_seconds}
        )
    )


def ceiling(source: Path, names: list[str], target: Path) -> float:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
         "--directory", str(source)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:

        def answers() -> bool:
            return (
                subprocess.run(
                    ["curl", "-sf", "-o", "/dev/null", f"http://127.0.0.1:{port}/config.json"]
                ).returncode
                == 0
            )

        wait_for(answers, 10, "the static server")
        target.mkdir()
        started = time.perf_counter()
        for name in names:
            subprocess.run(
                ["curl", "-sf", "-o", str(target / name), f"http://127.0.0.1:{port}/{name}"],
                check=True,
            )
        return time.perf_counter() - started
    finally:
        server.terminate()
        server.wait()


def sha256_only(connection_string: str) -> None:
    """Rewrite the published manifest as one without BLAKE3 (as older publishes wrote)."""
    container = BlobServiceClient.from_connection_string(connection_string).get_container_client(
        "bench"
    )
    blob = container.get_blob_client(f"model/{MANIFEST_NAME}")
    body = json.loads(blob.download_blob().readall())
    for entry in body["files"]:
        entry.pop("blake3", None)
    blob.upload_blob(json.dumps(body).encode(), overwrite=True)


def verify(directory: Path, digests: dict[str, str]) -> None:
    for name, digest in digests.items():
        if hashlib.sha256((directory / name).read_bytes()).hexdigest() != digest:
            raise SystemExit(f"sha256 mismatch in {name}")


def measure_store(method: str, uri: str, environ: dict[str, str], target: Path,
                  tuning: list[str]) -> dict[str, Any]:  # fmt: skip
    """One store's download by `method` (ours or obstore) in a fresh process."""
    fresh_start()
    argv = [sys.executable, __file__, "--measure-store", method, "--uri", uri,
            "--environ-json", json.dumps(environ), "--target", str(target), *tuning]  # fmt: skip
    output = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


def every_store(work: Path, size_mib: int, tuning: list[str]) -> dict[str, str]:
    """Each store's download by llmfleet and by obstore, printed as a table; RESULT fields."""
    model = work / "store-model"
    digests = make_model(model, size_mib, max(size_mib // 16, 1))
    total = sum(path.stat().st_size for path in model.iterdir())
    rows: list[tuple[str, str, float | None, float | None, str]] = []
    summary: dict[str, str] = {}
    for kind in STORES:
        server = start(kind, work)
        try:
            print(f"publishing {total / MIB:.0f} MiB to the {kind} emulator...", file=sys.stderr)
            environ = publish_to(kind, server, model)
            for method in ("ours", "obstore"):
                target = work / f"{kind}-{method}"
                result = measure_store(method, uri_of(kind), environ, target, tuning)
                if "error" in result:
                    rows.append((kind, method, None, None, str(result["error"])[:100]))
                    summary[f"{kind}_{method}_mb_s"] = "n/a"
                    shutil.rmtree(target, ignore_errors=True)
                    continue
                verify(target, digests)
                shutil.rmtree(target)
                mb_s = total / 1e6 / result["seconds"]
                cpu = result["cpu"] / (total / 1024**3)
                rows.append((kind, method, mb_s, cpu, ""))
                summary[f"{kind}_{method}_mb_s"] = f"{mb_s:.0f}"
                summary[f"{kind}_{method}_cpu_s_per_gib"] = f"{cpu:.2f}"
        finally:
            server.kill()
    print(f"\n{'store':<6} {'client':<9} {'MB/s':>7} {'CPU s/GiB':>10}  ({total / MIB:.0f} MiB)")
    for kind, method, rate, cpu_per_gib, note in rows:
        if rate is None or cpu_per_gib is None:
            print(f"{kind:<6} {method:<9} {'n/a':>7} {'n/a':>10}  {note}")
        else:
            print(f"{kind:<6} {method:<9} {rate:7.0f} {cpu_per_gib:10.2f}")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--files", type=int, default=4)
    parser.add_argument("--range-mib", type=int, default=16, help="downloader range size")
    parser.add_argument("--concurrency", type=int, default=8, help="downloader ranges in flight")
    parser.add_argument(
        "--hash-memory-mib", type=int, default=0,
        help="spare buffers for ranges that finish before the hash reaches them, MiB",
    )  # fmt: skip
    parser.add_argument(
        "--buffered", action="store_true", help=argparse.SUPPRESS
    )  # the downloader with O_DIRECT off
    parser.add_argument(
        "--store-size-mib", type=int, default=256, help="the model each store serves, MiB"
    )
    parser.add_argument(
        "--stores-only", action="store_true", help="only every store, ours beside obstore"
    )
    parser.add_argument("--measure", choices=["ours", "sdk"], help=argparse.SUPPRESS)
    parser.add_argument("--measure-store", choices=["ours", "obstore"], help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--environ-json", help=argparse.SUPPRESS)
    parser.add_argument("--prefix", default="model", help=argparse.SUPPRESS)
    parser.add_argument("--connection-string", help=argparse.SUPPRESS)
    parser.add_argument("--target", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--names", help=argparse.SUPPRESS)
    parser.add_argument("--quick", action="store_true", help="16 MiB, stores 8 MiB (CI)")
    args = parser.parse_args()
    if args.quick:
        args.size_mib, args.files, args.store_size_mib = 16, 2, 8
    settings = DownloadSettings(
        concurrency=args.concurrency, range_bytes=args.range_mib * MIB,
        hash_memory_bytes=args.hash_memory_mib * MIB, direct_io=not args.buffered,
    )  # fmt: skip
    if args.measure_store:
        try:
            seconds, cpu = measure_here_store(
                args.measure_store, args.uri, json.loads(args.environ_json), args.target, settings
            )
        except Exception as exc:
            print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0]}"}))
            return
        print(json.dumps({"seconds": seconds, "cpu": cpu}))
        return
    tuning = ["--range-mib", str(args.range_mib), "--concurrency", str(args.concurrency),
              "--hash-memory-mib", str(args.hash_memory_mib)]  # fmt: skip
    if args.stores_only:
        work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-"))
        try:
            summary = every_store(work, args.store_size_mib, tuning)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print("RESULT " + " ".join(f"{key}={value}" for key, value in summary.items()))
        return
    if args.measure:
        measure_here(
            args.measure, args.connection_string, args.target, args.names.split(","), settings,
            args.prefix,
        )  # fmt: skip
        return
    work = Path(tempfile.mkdtemp(prefix="llmfleet-bench-"))
    azurite = Azurite(work / "azurite").start()
    try:
        model = work / "model"
        digests = make_model(model, args.size_mib, args.files)
        names = sorted(digests)
        total = sum((model / name).stat().st_size for name in names)
        print(f"publishing {total / MIB:.0f} MiB to Azurite (in memory)...", file=sys.stderr)
        publish(model, "azure://bench/model", azurite.environ(), stream=io.StringIO())

        connection = azurite.connection_string()
        result = measure("ours", connection, work / "ours", names, tuning)
        seconds, cpu, verify_seconds = result["seconds"], result["cpu"], result["verify_seconds"]
        verify(work / "ours", digests)
        shutil.rmtree(work / "ours")
        # The same, written through the page cache (AGENT_DOWNLOAD_DIRECT_IO=false).
        result = measure("ours", connection, work / "ours", names, [*tuning, "--buffered"])
        seconds_buffered, cpu_buffered = result["seconds"], result["cpu"]
        verify(work / "ours", digests)
        shutil.rmtree(work / "ours")
        # The same bytes, verified as a manifest published before BLAKE3 asks: sha256.
        sha256_only(connection)
        result = measure("ours", connection, work / "ours", names, tuning)
        seconds_sha, cpu_sha = result["seconds"], result["cpu"]
        verify_sha = result["verify_seconds"]
        verify(work / "ours", digests)
        shutil.rmtree(work / "ours")
        sdk_seconds = measure("sdk", connection, work / "sdk", names, tuning)["seconds"]
        shutil.rmtree(work / "sdk")
        fresh_start()
        ceiling_seconds = ceiling(model, names, work / "curl")
        shutil.rmtree(work / "curl")
        azurite.kill()
        shutil.rmtree(model)
        stores_summary = every_store(work, args.store_size_mib, tuning)
    finally:
        azurite.kill()
        shutil.rmtree(work, ignore_errors=True)

    weights = sum((args.size_mib * MIB // args.files) for _ in names)
    rate = {name: weights / 1e6 / value for name, value in
            (("ours", seconds), ("sdk", sdk_seconds), ("ceiling", ceiling_seconds))}  # fmt: skip
    rate["sha256"] = weights / 1e6 / seconds_sha
    rate["buffered"] = weights / 1e6 / seconds_buffered
    cpu_per_gib = cpu / (total / 1024**3)
    cpu_per_gib_sha = cpu_sha / (total / 1024**3)
    cpu_per_gib_buffered = cpu_buffered / (total / 1024**3)
    tuned = f"{args.range_mib} MiB ranges, {args.concurrency} in flight"
    rows = [
        (f"llmfleet ({tuned}, BLAKE3)", seconds, rate["ours"]),
        (f"llmfleet ({tuned}, sha256-only manifest)", seconds_sha, rate["sha256"]),
        (f"llmfleet ({tuned}, BLAKE3, page cache)", seconds_buffered, rate["buffered"]),
        ("Azure SDK download_blob().readinto(), defaults", sdk_seconds, rate["sdk"]),
        ("ceiling: curl from python -m http.server, loopback", ceiling_seconds, rate["ceiling"]),
    ]
    print(f"\n{'method':<58} {'seconds':>8} {'MB/s':>8}")
    for label, taken, mb_s in rows:
        print(f"{label:<58} {taken:8.2f} {mb_s:8.0f}")
    print(f"\nhashing still running after the last byte: BLAKE3 {verify_seconds:.2f} s, "
          f"sha256 {verify_sha:.2f} s")  # fmt: skip
    print(
        f"llmfleet downloader CPU for {total / 1024**3:.2f} GiB: BLAKE3 {cpu:.2f} s "
        f"({cpu_per_gib:.2f} s/GiB), sha256 {cpu_sha:.2f} s ({cpu_per_gib_sha:.2f} s/GiB), "
        f"BLAKE3 through the page cache {cpu_buffered:.2f} s ({cpu_per_gib_buffered:.2f} s/GiB)"
    )
    summary = {
        "ours_mb_s": f"{rate['ours']:.0f}",
        "sdk_mb_s": f"{rate['sdk']:.0f}",
        "ceiling_mb_s": f"{rate['ceiling']:.0f}",
        "vs_ceiling": f"{rate['ours'] / rate['ceiling']:.2f}",
        "vs_sdk": f"{rate['ours'] / rate['sdk']:.1f}",
        "sha256_mb_s": f"{rate['sha256']:.0f}",
        "cpu_s_per_gib": f"{cpu_per_gib:.2f}",
        "cpu_s_per_gib_sha256": f"{cpu_per_gib_sha:.2f}",
        "buffered_mb_s": f"{rate['buffered']:.0f}",
        "cpu_s_per_gib_buffered": f"{cpu_per_gib_buffered:.2f}",
        **stores_summary,
    }
    print("RESULT " + " ".join(f"{key}={value}" for key, value in summary.items()))


if __name__ == "__main__":
    main()
