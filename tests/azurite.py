"""A real Azurite (Azure Blob emulator) process for the tests, started and stopped by them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import requests

from nodeagent.store.azure import AZURITE_ACCOUNT, AZURITE_KEY
from tests.support import free_port, wait_for

ROOT = Path(__file__).resolve().parents[1]
AZURITE = ROOT / "node_modules" / ".bin" / "azurite-blob"


@dataclass
class Azurite:
    """Azurite on a free port; in memory, or on disk under `location` to survive a restart."""

    workdir: Path
    location: Path | None = None
    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def account_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{AZURITE_ACCOUNT}"

    def connection_string(self, key: str = AZURITE_KEY) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={AZURITE_ACCOUNT};AccountKey={key};"
            f"BlobEndpoint={self.account_url};"
        )

    def environ(self, key: str = AZURITE_KEY) -> dict[str, str]:
        return {"AZURE_STORAGE_CONNECTION_STRING": self.connection_string(key)}

    def start(self) -> Azurite:
        if not AZURITE.exists():
            pytest.fail(f"Azurite is not installed ({AZURITE}): `make test` runs npm ci")
        storage = ["--location", str(self.location)] if self.location else ["--inMemoryPersistence"]
        argv = [
            str(AZURITE), "--blobHost", "127.0.0.1", "--blobPort", str(self.port),
            "--skipApiVersionCheck", "--loose", "--disableTelemetry", *storage,
        ]  # fmt: skip
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / "azurite.log").open("ab")
        self.process = subprocess.Popen(
            argv, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        wait_for(self._answers, 30, f"Azurite on port {self.port}")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(
                f"Azurite exited: {(self.workdir / 'azurite.log').read_text()[-2000:]}"
            )
        try:
            requests.get(f"{self.account_url}?comp=list", timeout=1)
        except requests.ConnectionError:
            return False
        return True

    def wait_saved(self) -> None:
        """On disk, Azurite saves its metadata every 5 s: a SIGKILL before then loses writes."""
        assert self.location is not None, "an in-memory Azurite keeps nothing"
        written = time.time()
        database = self.location / "__azurite_db_blob__.json"
        wait_for(
            lambda: database.exists() and database.stat().st_mtime > written, 15, "Azurite's save"
        )

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost host: connections drop mid-transfer."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None
