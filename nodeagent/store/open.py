"""From a source URI to the store that reads it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import aiohttp

from nodeagent.store.azure import AzureBucket, AzureCredentials, AzureStore
from nodeagent.store.base import MANIFEST_NAME, Bucket, Manifest, Store, StoreError, no_model
from nodeagent.store.gcs import GcsBucket, GcsStore
from nodeagent.store.local import LocalStore, local_path
from nodeagent.store.s3 import S3Bucket, S3Store

# Every scheme a source may have, with the form its URI takes.
SCHEMES = {
    "azure": "azure://<container>/<prefix>",
    "s3": "s3://<bucket>/<prefix>",
    "gs": "gs://<bucket>/<prefix>",
    "file": "file:///<directory>",
}


def _unknown(uri: str) -> StoreError:
    return StoreError("bad_uri", f"{uri!r}: a source is one of {', '.join(SCHEMES.values())}", 400)


def open_store(uri: str, session: aiohttp.ClientSession, environ: Mapping[str, str]) -> Store:
    """The store that downloads from `uri` (raises StoreError for an unknown scheme, a
    malformed URI or missing credentials)."""
    scheme = uri.partition("://")[0]
    if scheme == "azure":
        return AzureStore(uri, session, AzureCredentials.from_environment(environ))
    if scheme == "s3":
        return S3Store(uri, environ)
    if scheme == "gs":
        return GcsStore(uri, session, environ)
    if scheme == "file":
        return LocalStore(uri)
    raise _unknown(uri)


def open_bucket(uri: str, environ: Mapping[str, str]) -> Bucket:
    """The blocking side of the store at `uri`, for publishing and management commands
    (file:// has none: a directory is read and written directly)."""
    scheme = uri.partition("://")[0]
    if scheme == "azure":
        return AzureBucket(uri, environ)
    if scheme == "s3":
        return S3Bucket(uri, environ)
    if scheme == "gs":
        return GcsBucket(uri, environ)
    raise _unknown(uri)


def read_manifest(uri: str, environ: Mapping[str, str]) -> Manifest:
    """The published model's manifest, read synchronously (for management commands)."""
    if uri.startswith("file://"):
        path = local_path(uri) / MANIFEST_NAME
        if not path.exists():
            if not local_path(uri).is_dir():
                raise StoreError("model_not_found", f"{uri} is not a directory on this host", 404)
            return Manifest.of_directory(local_path(uri))
        return Manifest.from_json(Path(path).read_bytes())
    return Manifest.from_json(read_file(uri, MANIFEST_NAME, environ, str(no_model(uri))))


def read_file(
    uri: str, name: str, environ: Mapping[str, str], missing: str, *, max_bytes: int = 16 << 20
) -> bytes:
    """One small file of a published model (its manifest, an adapter's config), read
    synchronously (for management commands); StoreError `model_not_found` with `missing`."""
    if uri.startswith("file://"):
        path = local_path(uri) / name
        if not path.is_file():
            raise StoreError("model_not_found", missing, 404)
        return path.read_bytes()[:max_bytes]
    return open_bucket(uri, environ).get(name, missing, max_bytes)
