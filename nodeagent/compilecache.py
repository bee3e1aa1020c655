"""vLLM's compile caches, kept per model and travelling with it through the store.

vLLM caches `torch.compile` output (and CUDA graphs' inputs, and its model-class
inspection) under `VLLM_CACHE_ROOT`; a start with a warm cache skips compiling. Each
engine gets a root of its own, keyed by what decides whether a cache fits: the model's
source and revision, the engine arguments, vLLM's version and the kind of device. It
lives in the agent's cache beside the model (`<model>/.llmfleet-compile/<key>/`), so it
is evicted with the model and a restart on the same host never compiles again.

After the first start that compiled, the agent publishes the root to the store beside
the checkpoint (`<source>.llmfleet-compile/<key>`, manifest last, like a model), and an
agent on the same kind of device without one downloads it before its engine starts,
with the same downloader and verification. A published cache that does not download or
verify is ignored; a local one an engine fails with is deleted and the start tried once
more without it. A cache never fails a load.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import logging
import os
import platform
import shutil
import stat
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from nodeagent.download import DownloadProgress, DownloadSettings, download
from nodeagent.protocol import CompileCacheOrigin
from nodeagent.store import MANIFEST_NAME, StoreError, open_store
from nodeagent.store.local import local_path

log = logging.getLogger(__name__)

DIRECTORY = ".llmfleet-compile"
COMPILED = "torch_compile_cache"  # what vLLM writes below VLLM_CACHE_ROOT when it compiles
STORE_SUFFIX = ".llmfleet-compile"
FETCH_SECONDS = 120.0
# How the start found its compile cache, for the LoadEvent: "new" (none: this start
# compiles and publishes), "local" (this agent's, from an earlier start), "store" (another
# agent's, downloaded), "discarded" (one the engine failed with, deleted; started without).
Origin = CompileCacheOrigin


def device_kind(gpu_names: Sequence[str]) -> str:
    """The kind of device compiled code is for: the GPU model, or the CPU model and its
    instruction set (compiled CPU kernels use what the CPU has)."""
    if gpu_names:
        return "cuda:" + gpu_names[0]
    model, flags = platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name" and model == platform.machine():
                model = f"{platform.machine()}:{value.strip()}"
            elif key.strip() == "flags" and not flags:
                flags = hashlib.sha256(" ".join(sorted(value.split())).encode()).hexdigest()[:12]
    except OSError:
        pass
    return f"cpu:{model}:{flags}"


def cache_key(
    source: str, revision: str, args: Sequence[str], vllm_version: str, device: str
) -> str:
    text = json.dumps([source, revision, list(args), vllm_version, device])
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def store_uri(source: str, key: str) -> str:
    """Where the cache of `key` is published: beside the checkpoint, never inside it."""
    return f"{source.rstrip('/')}{STORE_SUFFIX}/{key}"


def has_files(root: Path) -> bool:
    return root.is_dir() and any(path.is_file() for path in root.rglob("*"))


@dataclass
class CompileCache:
    """The compile cache of one engine start."""

    root: Path
    uri: str
    origin: Origin = "new"
    note: str = ""

    @classmethod
    def for_model(cls, model_dir: Path, source: str, key: str) -> CompileCache:
        root = model_dir / DIRECTORY / key
        return cls(root, store_uri(source, key), "local" if has_files(root) else "new")

    async def fetch(
        self, session: aiohttp.ClientSession, environ: Mapping[str, str],
        settings: DownloadSettings, seconds: float,
    ) -> None:  # fmt: skip
        """Download the published cache, if there is one and this agent has none."""
        if self.origin != "new":
            return
        staging = self.root.with_name(f".partial-{self.root.name}")
        try:
            if (
                self.uri.startswith("file://")
                and not (local_path(self.uri) / MANIFEST_NAME).exists()
            ):
                return  # nothing published (or a publish still under way: its manifest is last)
            # A cloud's client may look its credentials up over the network: not in the loop.
            store = await asyncio.to_thread(open_store, self.uri, session, environ)
            files = await store.listing()
            deadline = asyncio.get_running_loop().time() + seconds
            await download(store, files, staging, settings, DownloadProgress(), deadline)
            shutil.rmtree(self.root, ignore_errors=True)
            self.root.parent.mkdir(parents=True, exist_ok=True)
            staging.rename(self.root)
        except StoreError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            if exc.status != 404 and exc.code not in {"model_not_found", "model_incomplete"}:
                self._ignored(str(exc))
            return
        except OSError as exc:  # a full disk, permissions: never the load's failure
            shutil.rmtree(staging, ignore_errors=True)
            self._ignored(f"{type(exc).__name__}: {exc}")
            return
        self.origin = "store"

    def _ignored(self, why: str) -> None:
        self.note = f"the published compile cache was ignored: {why}"[:500]
        log.warning("%s: %s", self.uri, self.note)

    def discard(self, why: str) -> None:
        """The engine failed with this cache: start without it."""
        shutil.rmtree(self.root, ignore_errors=True)
        self.origin, self.note = "discarded", f"the compile cache was deleted: {why}"[:500]

    @property
    def publishable(self) -> bool:
        """Compiled here for the first time: worth giving to the other agents. (An engine
        that compiles nothing, with --enforce-eager, leaves only vLLM's small model-info
        cache: not worth a publish.)"""
        return self.origin == "new" and has_files(self.root / COMPILED)


def publish_cache(cache: CompileCache, environ: Mapping[str, str]) -> None:
    """Publish a compile cache to the store (blocking: run it in a thread).

    The engine that wrote the cache runs code the agent does not control, and may still be
    writing: what is published is a copy of its regular files alone, each opened without
    following a link, so a link it planted (to the agent's credential, say) is never read."""
    from nodeagent.store.publish import publish

    if cache.uri.startswith("file://"):
        target = local_path(cache.uri)
        if (target / MANIFEST_NAME).exists():
            return  # another agent published this key already
    with tempfile.TemporaryDirectory(dir=cache.root.parent, prefix=".publishing-") as staging:
        copy_regular_files(cache.root, Path(staging))
        publish(Path(staging), cache.uri, environ, stream=io.StringIO())  # no progress bar


def copy_regular_files(source: Path, target: Path) -> int:
    """Copy the regular files below `source` to `target`, never through a link (files and
    directories that are links, and anything but regular files, are left out); how many."""
    copied = 0
    for directory, _, files, fd in os.fwalk(source, follow_symlinks=False):
        relative = Path(directory).relative_to(source)
        for name in files:
            try:
                handle = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=fd)
            except OSError:  # a link (ELOOP), or gone meanwhile
                continue
            with os.fdopen(handle, "rb") as reader:
                if not stat.S_ISREG(os.fstat(reader.fileno()).st_mode):
                    continue
                destination = target / relative / name
                destination.parent.mkdir(parents=True, exist_ok=True)
                with destination.open("wb") as writer:
                    shutil.copyfileobj(reader, writer)
            copied += 1
    return copied
