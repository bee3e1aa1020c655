"""Model stores: where checkpoints are published and read from.

`azure://<container>/<prefix>` (Azure Blob, or Azurite), `s3://<bucket>/<prefix>` (S3 and
S3-compatible stores), `gs://<bucket>/<prefix>` (Google Cloud Storage) and `file:///dir`.
A model is one prefix in Hugging Face layout plus `llmfleet-manifest.json`,
written last by `publish`, listing each file's size and sha256.
"""

from nodeagent.store.base import (
    MANIFEST_NAME,
    Manifest,
    ManifestFile,
    RemoteFile,
    Store,
    StoreError,
)
from nodeagent.store.open import SCHEMES, open_bucket, open_store, read_file, read_manifest

__all__ = [
    "MANIFEST_NAME",
    "SCHEMES",
    "Manifest",
    "ManifestFile",
    "RemoteFile",
    "Store",
    "StoreError",
    "open_bucket",
    "open_store",
    "read_file",
    "read_manifest",
]
