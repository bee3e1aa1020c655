"""From a source URI to the store that reads it."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import aiohttp

from nodeagent.store.azure import (
    AzureCredentials,
    AzureStore,
    blob_service,
    parse_azure_uri,
    sdk_errors,
)
from nodeagent.store.base import MANIFEST_NAME, Manifest, Store, StoreError
from nodeagent.store.local import LocalStore, local_path


def open_store(uri: str, session: aiohttp.ClientSession, environ: Mapping[str, str]) -> Store:
    if uri.startswith("azure://"):
        return AzureStore(uri, session, AzureCredentials.from_environment(environ))
    if uri.startswith("file://"):
        return LocalStore(uri)
    raise StoreError(
        "bad_uri", f"{uri!r}: sources are azure://<container>/<prefix> or file:///<dir>", 400
    )


def read_manifest(uri: str, environ: Mapping[str, str]) -> Manifest:
    """The published model's manifest, read synchronously (for management commands)."""
    if uri.startswith("file://"):
        path = local_path(uri) / MANIFEST_NAME
        if not path.exists():
            if not local_path(uri).is_dir():
                raise StoreError("model_not_found", f"{uri} is not a directory on this host", 404)
            return Manifest.of_directory(local_path(uri))
        return Manifest.from_json(Path(path).read_bytes())
    return Manifest.from_json(
        read_file(
            uri, MANIFEST_NAME, environ, f"{uri} holds no published model (no {MANIFEST_NAME})"
        )
    )


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
    container, prefix = parse_azure_uri(uri)
    blob = blob_service(AzureCredentials.from_environment(environ)).get_blob_client(
        container, f"{prefix}/{name}"
    )
    with sdk_errors(f"reading {uri}", not_found=missing):
        data: bytes = blob.download_blob(offset=0, length=max_bytes).readall()
        return data
