"""What every store offers the downloader, and the manifest that defines a published model."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import Callable, Iterable
from concurrent.futures import Executor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import urlsplit

T = TypeVar("T")

MANIFEST_NAME = "llmfleet-manifest.json"
MANIFEST_FORMAT = 1
_HASH_BLOCK = 4 * 1024 * 1024
# Throttling and server errors: every store's answers that a later try may pass.
RETRY_STATUSES = {408, 429, 500, 502, 503, 504}


class StoreError(RuntimeError):
    """A store problem that fails a load. `code` says which; `retryable` ones may pass."""

    def __init__(self, code: str, message: str, status: int = 502, retryable: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.status = status
        self.retryable = retryable


def http_status_error(status: int, what: str, body: str) -> StoreError:
    """A store's HTTP answer that is not the bytes asked for, as the StoreError it means."""
    detail = body[:300].replace("\n", " ")
    if status == 404:
        return StoreError("model_not_found", f"{what} does not exist in the store", 404)
    if status in (401, 403):
        return StoreError(
            "access_denied", f"the store denied access to {what} (HTTP {status}): {detail}", 403
        )
    if status == 412:
        return StoreError("blob_changed", f"{what} changed in the store during the download", 409)
    if status in RETRY_STATUSES:
        return StoreError(
            "store_unavailable", f"the store answered HTTP {status} for {what}", 503, True
        )
    return StoreError("store_error", f"the store answered HTTP {status} for {what}: {detail}")


@dataclass(frozen=True)
class ManifestFile:
    path: str
    size: int
    sha256: str
    # BLAKE3 (hex), verified instead of sha256 where present: ~1.7x faster on one core.
    # Manifests published before it have none (""), and are verified with sha256.
    blake3: str = ""


@dataclass(frozen=True)
class Manifest:
    """The published model: every file with its size and sha256."""

    files: tuple[ManifestFile, ...]

    @property
    def total_size(self) -> int:
        return sum(file.size for file in self.files)

    def to_json(self) -> str:
        files = [{k: v for k, v in asdict(file).items() if v != ""} for file in self.files]
        body = {"format": MANIFEST_FORMAT, "total_size": self.total_size, "files": files}
        return json.dumps(body, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            body: Any = json.loads(text)
            files = tuple(
                ManifestFile(
                    str(f["path"]), int(f["size"]), str(f["sha256"]), str(f.get("blake3") or "")
                )
                for f in body["files"]
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise StoreError(
                "bad_manifest", f"the model's manifest cannot be read: {exc}"
            ) from None
        for file in files:
            if problem := path_problem(file.path):
                raise StoreError("bad_manifest", f"the manifest names {file.path!r}: {problem}")
        return cls(files)

    @property
    def identity(self) -> str:
        """The model's identity (`identity`): equal for equal manifests in any store."""
        return identity(self.files) or ""

    def differences(self, other: Manifest) -> list[str]:
        """What makes `other` another model than this one: files missing on either side, or
        of another size or digest (a digest only one side has is not compared)."""
        mine, theirs = {f.path: f for f in self.files}, {f.path: f for f in other.files}
        found = [f"{path} is missing" for path in sorted(mine.keys() - theirs.keys())]
        found += [f"{path} is extra" for path in sorted(theirs.keys() - mine.keys())]
        for path in sorted(mine.keys() & theirs.keys()):
            a, b = mine[path], theirs[path]
            if a.size != b.size:
                found.append(f"{path} is {b.size} bytes, not {a.size}")
            elif (a.sha256 and b.sha256 and a.sha256 != b.sha256) or (
                a.blake3 and b.blake3 and a.blake3 != b.blake3
            ):
                found.append(f"{path} has other contents (its digest differs)")
        return found

    @classmethod
    def of_directory(
        cls, directory: Path, on_bytes: Callable[[int], None] = lambda n: None
    ) -> Manifest:
        """Sizes, sha256 and BLAKE3 of every file below `directory` (the manifest itself
        excepted); both digests in one read of each file."""
        files = []
        for path in model_files(directory):
            relative = path.relative_to(directory).as_posix()
            sha256, blake3 = digests_of(path, on_bytes)
            files.append(ManifestFile(relative, path.stat().st_size, sha256, blake3))
        return cls(tuple(files))


def identity(files: Iterable[ManifestFile | RemoteFile]) -> str | None:
    """What a published model is, as one hex digest: every file's path, size and sha256 (not
    BLAKE3, which older manifests lack, nor the store's versions, which differ from store to
    store). The same in every store that holds the model; None for files without digests (a
    plain directory, published without a manifest)."""
    lines = []
    for file in sorted(files, key=lambda f: f.path):
        if not file.sha256:
            return None
        lines.append(f"{file.path}\t{file.size}\t{file.sha256}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def path_problem(path: str) -> str:
    """Why `path` cannot be a file of a published model ("" when it can): only what a
    checkpoint holds, under its directory, never the agent's own files beside it (its
    metadata, download journal, lock, or a compile cache the engine would then run, even with
    AGENT_SHARE_COMPILE_CACHE=false)."""
    parts = path.split("/")
    if not path or path.startswith("/") or "\\" in path or "\x00" in path:
        return "not a relative path"
    if any(part in ("", ".", "..") for part in parts):
        return "a path outside the model, or not in its plain form"
    if any(part.startswith(".llmfleet") for part in parts) or path == MANIFEST_NAME:
        return "the agent's own files are not a model's"
    return ""


def model_files(directory: Path) -> list[Path]:
    """The files of the model below `directory`: not the manifest, nor llmfleet's own
    (`.llmfleet*` files and directories: metadata, journals, compile caches)."""
    return sorted(
        path
        for path in directory.rglob("*")
        if path.is_file()
        and path.name != MANIFEST_NAME
        and not any(part.startswith(".llmfleet") for part in path.relative_to(directory).parts)
    )


def digests_of(path: Path, on_bytes: Callable[[int], None] = lambda n: None) -> tuple[str, str]:
    """(sha256, BLAKE3) of a file, hex."""
    sha256, blake3 = hashlib.sha256(), new_blake3()
    with path.open("rb", buffering=0) as reader:
        while block := reader.read(_HASH_BLOCK):
            sha256.update(block)
            blake3.update(block)
            on_bytes(len(block))
    return sha256.hexdigest(), blake3.hexdigest()


def new_blake3() -> Any:
    # One thread: on a host that is downloading, the other cores have work of their own, and
    # BLAKE3's threads cost more CPU per byte than they save in time.
    from blake3 import blake3  # type: ignore[import-not-found,unused-ignore]

    return blake3()


@dataclass(frozen=True)
class RemoteFile:
    """One file of a model in a store. `etag` pins every read to this version of it."""

    path: str
    size: int
    etag: str
    sha256: str | None
    blake3: str | None = None

    @property
    def digest(self) -> tuple[str, str] | None:
        """What verifies it: ("blake3", hex) where the manifest has BLAKE3, else ("sha256",
        hex), None without a manifest."""
        if self.blake3:
            return "blake3", self.blake3
        return ("sha256", self.sha256) if self.sha256 else None


class Store(Protocol):
    uri: str

    async def listing(self) -> list[RemoteFile]:
        """The model's files with size, version and (from the manifest) sha256."""

    async def read_range(
        self,
        file: RemoteFile,
        start: int,
        end: int,
        buffer: memoryview,
        on_bytes: Callable[[int], None],
    ) -> None:
        """Fill `buffer` (end - start bytes) with bytes start..end-1 of `file`, calling
        on_bytes(count) as they arrive. The buffer is the downloader's, reused: a store
        reads into it rather than handing out new bytes, and is done with it on return,
        cancellation included.

        Raises StoreError: `blob_changed` when the file is no longer the listed version;
        retryable ones for throttling, server errors and broken connections.
        """


async def thread_to_end(
    function: Callable[..., T], *args: Any, executor: Executor | None = None,
    on_cancel: Callable[[], None] = lambda: None,
) -> T:  # fmt: skip
    """`function(*args)` in a worker thread, awaited to its end even when cancelled.

    The threads of a download write into reused buffers and through descriptors that the
    download closes when it ends: a cancellation that left one running could let it write
    into a buffer given to another range, or into whatever file reuses the descriptor's
    number. `on_cancel` is asked to make the thread finish soon (shut its socket down).
    """
    future = asyncio.get_running_loop().run_in_executor(executor, function, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        on_cancel()
        await asyncio.wait([future])
        if not future.cancelled():
            future.exception()  # retrieved: the cancellation is what the caller hears of
        raise


def parse_bucket_uri(uri: str, scheme: str, bucket: str = "bucket") -> tuple[str, str]:
    """`scheme://bucket/some/prefix` → (`bucket`, `some/prefix`); StoreError `bad_uri`
    naming the form (`bucket` is what the cloud calls it: Azure's are containers)."""
    parts = urlsplit(uri)
    name, prefix = parts.netloc, parts.path.strip("/")
    if parts.scheme != scheme or not name or not prefix:
        raise StoreError("bad_uri", f"{uri!r} is not {scheme}://<{bucket}>/<prefix>", 400)
    return name, prefix


def no_model(uri: str) -> StoreError:
    """A prefix without a manifest: no model, or a publish that has not finished."""
    return StoreError(
        "model_not_found", f"{uri} holds no published model (no {MANIFEST_NAME})", 404
    )


def join_listing(
    manifest: Manifest | None, found: dict[str, tuple[int, str]], uri: str
) -> list[RemoteFile]:
    """The listing a download follows: the manifest's files, each with the store's size and etag."""
    if manifest is None:  # a directory published without one: its files, bar the agent's own
        return [
            RemoteFile(path, size, etag, None)
            for path, (size, etag) in sorted(found.items())
            if not path_problem(path)
        ]
    files = []
    for entry in manifest.files:
        if entry.path not in found:
            raise StoreError(
                "model_incomplete",
                f"{uri}: {entry.path} is in the manifest but not in the store",
                404,
            )
        size, etag = found[entry.path]
        if size != entry.size:
            raise StoreError(
                "size_mismatch",
                f"{uri}: {entry.path} is {size} bytes in the store, {entry.size} in the manifest",
            )
        files.append(RemoteFile(entry.path, size, etag, entry.sha256, entry.blake3 or None))
    return files


def files_named(files: Iterable[RemoteFile]) -> dict[str, RemoteFile]:
    return {file.path: file for file in files}


class Bucket(Protocol):
    """The blocking side of a store at one model's prefix: what publishing and management
    commands use. Names are relative to the prefix."""

    uri: str

    def prepare(self) -> None:
        """Make sure the model can be written there (Azure creates its container; S3 and GCS
        buckets are an operator's, and a missing one is an error)."""

    def remove(self, name: str) -> None:
        """Delete one object; one that is not there is no error."""

    def upload(self, name: str, path: Path, on_bytes: Callable[[int], None]) -> None:
        """Write a local file, calling on_bytes(count) as its bytes are sent."""

    def put(self, name: str, data: bytes) -> None:
        """Write a small object."""

    def get(self, name: str, missing: str, max_bytes: int) -> bytes:
        """The first `max_bytes` of one small object; StoreError `model_not_found` with
        `missing` when it is not there."""
