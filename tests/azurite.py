"""A real Azurite (Azure Blob emulator) process for the tests, started and stopped by them."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from nodeagent.store.azure import AZURITE_ACCOUNT, AZURITE_KEY
from tests.clouds import Emulator
from tests.support import wait_for

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / "node_modules" / ".bin" / "azurite-blob"


@dataclass
class Azurite(Emulator):
    """Azurite on a free port; in memory, or on disk under `location` to survive a restart."""

    location: Path | None = None

    @property
    def account_url(self) -> str:
        return f"{self.url}/{AZURITE_ACCOUNT}"

    def connection_string(self, key: str = AZURITE_KEY) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={self.account_url};"
        )

    def environ(self, key: str = AZURITE_KEY) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string(key)}

    def argv(self) -> list[str]:
        storage = ["--location", str(self.location)] if self.location else ["--inMemoryPersistence"]
        return [
            str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
            "--skipApiVersionCheck", "--loose", "--disableTelemetry", *storage,
        ]  # fmt: skip

    def start(self) -> Azurite:
        if not AZURITE.exists():
            pytest.fail(f"Azurite is not installed ({AZURITE}): `make test` runs npm ci")
        self._spawn("azurite", f"/{AZURITE_ACCOUNT}?comp=list")
        return self

    def wait_saved(self) -> None:
        """On disk, Azurite saves its metadata every 5 s: a SIGKILL before then loses writes."""
        assert self.location is not None, "an in-memory Azurite keeps nothing"
        written = time.time()
        database = self.location / "__azurite_db_blob__.json"
        wait_for(
            lambda: database.exists() and database.stat().st_mtime > written, 15, "Azurite's save"
        )
