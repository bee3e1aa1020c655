"""Real S3 and GCS emulators for the tests, started and stopped by them: moto in server mode
(S3) and gcp-storage-emulator (GCS), each its own process, so a test can SIGKILL it mid-
download as a crash or a lost host would."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests

from tests.support import free_port_block, wait_for

BUCKET = "models"
# Any key may sign at a moto without authentication; with it, only the IAM user's below.
ANY_KEY = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
_S3_POLICY = json.dumps(
    {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
)


@dataclass
class Emulator:
    """A server process on a free loopback port, logging into `workdir`."""

    workdir: Path
    # Below the ephemeral range: a port an emulator gives up (killed, to restart) is not taken
    # meanwhile by an outgoing connection.
    port: int = field(default_factory=lambda: free_port_block(1))
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Emulator:
        raise NotImplementedError

    def _spawn(self, name: str, health: str) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        log = (self.workdir / f"{name}.log").open("ab")
        self.process = subprocess.Popen(
            self.argv(), cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip

        def answers() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(
                    f"{name} exited: {(self.workdir / f'{name}.log').read_text()[-2000:]}"
                )
            try:
                requests.get(f"{self.url}{health}", timeout=1)
            except requests.ConnectionError:
                return False
            return True

        wait_for(answers, 30, f"{name} on port {self.port}")

    def kill(self) -> None:
        """SIGKILL, as a crash or a lost host: connections drop mid-transfer."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None


@dataclass
class Moto(Emulator):
    """moto's S3 in server mode, holding its objects in memory. With `auth`, it checks every
    request's SigV4 signature against an IAM user of its own (`environ()` has its key), as
    S3 does; without, any key passes."""

    auth: bool = True
    keys: dict[str, str] = field(default_factory=dict)

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> Moto:
        self._spawn("moto", "/moto-api/")
        import boto3

        self.keys = dict(ANY_KEY)
        if self.auth:
            iam = boto3.client(
                "iam", endpoint_url=self.url, region_name="us-east-1", **_lower(ANY_KEY)
            )
            iam.create_user(UserName="llmfleet")
            iam.put_user_policy(UserName="llmfleet", PolicyName="s3", PolicyDocument=_S3_POLICY)
            key = iam.create_access_key(UserName="llmfleet")["AccessKey"]
            self.keys = {
                "AWS_ACCESS_KEY_ID": key["AccessKeyId"],
                "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
            }
            # From now on every request is authenticated and authorised.
            requests.post(
                f"{self.url}/moto-api/reset-auth", data=b"0", timeout=5
            ).raise_for_status()
        self.client().create_bucket(Bucket=BUCKET)
        return self

    def environ(self, secret: str | None = None) -> dict[str, str]:
        keys = dict(self.keys)
        if secret is not None:
            keys["AWS_SECRET_ACCESS_KEY"] = secret
        return {**keys, "AWS_ENDPOINT_URL_S3": self.url, "AWS_REGION": "us-east-1"}

    def client(self) -> Any:
        from nodeagent.store.s3 import S3Connection

        return S3Connection(self.environ()).client

    def overwrite(self, key: str, data: bytes) -> None:
        self.client().put_object(Bucket=BUCKET, Key=key, Body=data)


def _lower(keys: dict[str, str]) -> dict[str, str]:
    return {name.lower(): value for name, value in keys.items()}


@dataclass
class GcsEmulator(Emulator):
    """gcp-storage-emulator, keeping its objects on disk under `data_dir` so a restart finds
    them (with the same generations). It checks no credentials."""

    data_dir: Path | None = None

    def argv(self) -> list[str]:
        data = ["--data-dir", str(self.data_dir)] if self.data_dir else []
        return [
            sys.executable, "-m", "gcp_storage_emulator", *data, "start", "--host", "127.0.0.1",
            "--port", str(self.port), "--default-bucket", BUCKET, "--quiet",
            *([] if self.data_dir else ["--in-memory"]),
        ]  # fmt: skip

    def start(self) -> GcsEmulator:
        self._spawn("gcs", "/")
        return self

    def environ(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url, "GOOGLE_CLOUD_PROJECT": "llmfleet-tests"}

    def overwrite(self, name: str, data: bytes) -> None:
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        client = storage.Client(
            project="llmfleet-tests", credentials=AnonymousCredentials(),
            client_options={"api_endpoint": self.url},
        )  # fmt: skip
        client.bucket(BUCKET).blob(name).upload_from_string(data)
