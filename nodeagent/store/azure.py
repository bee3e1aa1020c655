"""Azure Blob (and Azurite) as a model store, read with plain HTTP range requests.

The Azure SDK's downloads top out at a third of what this machine's loopback
carries (see ../shared/FACTS.md), so reads are plain GETs authorised by a SAS:
listings with aiohttp, ranges read into the downloader's buffers by
`nodeagent.store.ranges`. Credentials come from the environment: a connection string, or an account
URL with a SAS token or an account key; a key signs a short-lived read/list SAS
locally (no request leaves the host for it).
"""

from __future__ import annotations

import contextlib
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp

from nodeagent.store.base import (
    MANIFEST_NAME,
    Manifest,
    RemoteFile,
    StoreError,
    http_status_error,
    join_listing,
    no_model,
    parse_bucket_uri,
)
from nodeagent.store.ranges import read_into

# Azurite's well-known development account (public, documented by Microsoft).
AZURITE_ACCOUNT = "devstoreaccount1"
AZURITE_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)
_API_VERSION = "2021-08-06"
_SAS_LIFETIME = timedelta(hours=2)
_LIST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)


def parse_azure_uri(uri: str) -> tuple[str, str]:
    """`azure://container/some/prefix` → (`container`, `some/prefix`)."""
    return parse_bucket_uri(uri, "azure", "container")


@dataclass(frozen=True)
class AzureCredentials:
    """An account endpoint and a way to authorise reads: a fixed SAS, or a key to sign one."""

    account_url: str
    account_name: str
    sas_token: str = ""
    account_key: str = ""

    @classmethod
    def from_environment(cls, environ: Mapping[str, str]) -> AzureCredentials:
        if environ.get("AZURE_STORAGE_CONNECTION_STRING"):
            return cls.from_connection_string(environ["AZURE_STORAGE_CONNECTION_STRING"])
        url = environ.get("AZURE_STORAGE_ACCOUNT_URL", "").rstrip("/")
        if not url:
            raise StoreError(
                "no_credentials",
                "azure:// sources need AZURE_STORAGE_CONNECTION_STRING, or "
                "AZURE_STORAGE_ACCOUNT_URL with AZURE_STORAGE_SAS_TOKEN or AZURE_STORAGE_KEY",
                400,
            )
        name = environ.get("AZURE_STORAGE_ACCOUNT") or _account_name(url)
        return cls(url, name, environ.get("AZURE_STORAGE_SAS_TOKEN", "").lstrip("?"),
                   environ.get("AZURE_STORAGE_KEY", ""))  # fmt: skip

    @classmethod
    def from_connection_string(cls, text: str) -> AzureCredentials:
        fields = dict(
            part.split("=", 1) for part in text.strip().strip(";").split(";") if "=" in part
        )
        if fields.get("UseDevelopmentStorage", "").lower() == "true":
            return cls(
                f"http://127.0.0.1:10000/{AZURITE_ACCOUNT}",
                AZURITE_ACCOUNT,
                account_key=AZURITE_KEY,
            )
        name = fields.get("AccountName", "")
        url = fields.get("BlobEndpoint", "").rstrip("/")
        if not url and name:
            protocol = fields.get("DefaultEndpointsProtocol", "https")
            url = f"{protocol}://{name}.blob.{fields.get('EndpointSuffix', 'core.windows.net')}"
        if not url:
            raise StoreError(
                "no_credentials", "the connection string names no BlobEndpoint or AccountName", 400
            )
        sas = fields.get("SharedAccessSignature", "").lstrip("?")
        return cls(url, name or _account_name(url), sas, fields.get("AccountKey", ""))

    def sas_for(self, container: str) -> str:
        """A query string authorising read and list on the container."""
        if self.sas_token:
            return self.sas_token
        if not self.account_key:
            raise StoreError(
                "no_credentials", "neither a SAS token nor an account key is configured", 400
            )
        from azure.storage.blob import ContainerSasPermissions, generate_container_sas

        now = datetime.now(UTC)
        try:
            return generate_container_sas(
                self.account_name, container, account_key=self.account_key,
                permission=ContainerSasPermissions(read=True, list=True),
                start=now - timedelta(minutes=5), expiry=now + _SAS_LIFETIME,
            )  # fmt: skip
        except (ValueError, TypeError) as exc:  # a key that is not base64
            raise StoreError(
                "access_denied", f"the account key cannot sign requests: {exc}", 403
            ) from None


def blob_service(credentials: AzureCredentials) -> Any:
    """The Azure SDK's client, for what is not a download: publishing, reading a manifest."""
    from azure.storage.blob import BlobServiceClient

    credential: Any = credentials.sas_token or None
    if credentials.account_key:
        credential = {
            "account_name": credentials.account_name,
            "account_key": credentials.account_key,
        }
    return BlobServiceClient(credentials.account_url, credential=credential)


@contextlib.contextmanager
def sdk_errors(what: str, not_found: str = "") -> Iterator[None]:
    """The Azure SDK's exceptions inside the block, as StoreErrors that name `what`."""
    from azure.core.exceptions import HttpResponseError, ResourceNotFoundError

    try:
        yield
    except ResourceNotFoundError:
        raise StoreError(
            "model_not_found", not_found or f"{what}: not found in the store", 404
        ) from None
    except HttpResponseError as exc:
        if exc.status_code in (401, 403):
            raise StoreError(
                "access_denied", f"the store denied {what}: {exc.reason}", 403
            ) from None
        raise StoreError("store_error", f"{what} failed: {exc.message}") from None


def _account_name(url: str) -> str:
    parts = urlsplit(url)
    host = parts.hostname or ""
    # Azurite and other emulators put the account in the path; Azure in the host name.
    if parts.path.strip("/"):
        return parts.path.strip("/").split("/")[0]
    return host.split(".")[0]


class AzureStore:
    def __init__(
        self, uri: str, session: aiohttp.ClientSession, credentials: AzureCredentials
    ) -> None:
        self.uri = uri
        self.session = session
        self.container, self.prefix = parse_azure_uri(uri)
        self.credentials = credentials
        self._sas = credentials.sas_for(self.container)
        self._container_url = f"{credentials.account_url}/{self.container}"

    def _blob_url(self, path: str) -> str:
        return f"{self._container_url}/{quote(f'{self.prefix}/{path}')}?{self._sas}"

    async def _list(self) -> dict[str, tuple[int, str]]:
        found: dict[str, tuple[int, str]] = {}
        marker = ""
        while True:
            query = f"restype=container&comp=list&prefix={quote(self.prefix + '/')}&{self._sas}"
            if marker:
                query += f"&marker={quote(marker)}"
            text = await self._get_text(
                f"{self._container_url}?{query}", f"the container {self.container}"
            )
            # The store's own listing, fetched over an authorised channel.
            root = ElementTree.fromstring(text)  # noqa: S314
            for blob in root.iter("Blob"):
                name = blob.findtext("Name", "")
                size = int(blob.findtext("Properties/Content-Length", "0"))
                etag = blob.findtext("Properties/Etag", "")
                found[name.removeprefix(self.prefix + "/")] = (size, etag)
            marker = root.findtext("NextMarker") or ""
            if not marker:
                return found

    async def _get_text(self, url: str, what: str) -> str:
        headers = {"x-ms-version": _API_VERSION}
        try:
            async with self.session.get(url, headers=headers, timeout=_LIST_TIMEOUT) as response:
                body = await response.text()
                if response.status != 200:
                    raise http_status_error(response.status, what, body)
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StoreError(
                "store_unreachable", f"the store did not answer for {what}: {exc!r}", 503, True
            ) from None

    async def listing(self) -> list[RemoteFile]:
        found = await self._list()
        if MANIFEST_NAME not in found:
            raise no_model(self.uri)
        manifest = Manifest.from_json(
            await self._get_text(self._blob_url(MANIFEST_NAME), MANIFEST_NAME)
        )
        return join_listing(manifest, found, self.uri)

    async def read_range(
        self,
        file: RemoteFile,
        start: int,
        end: int,
        buffer: memoryview,
        on_bytes: Callable[[int], None],
    ) -> None:
        headers = {
            "x-ms-version": _API_VERSION,
            "Range": f"bytes={start}-{end - 1}",
            "If-Match": file.etag,
        }
        await read_into(
            self._blob_url(file.path),
            headers,
            buffer,
            file.path,
            lambda status, body: http_status_error(status, file.path, body),
            on_bytes,
        )


class AzureBucket:
    """The blocking side of an Azure store: publishing and reading single files (the SDK)."""

    def __init__(self, uri: str, environ: Mapping[str, str]) -> None:
        self.uri = uri
        container, self.prefix = parse_azure_uri(uri)
        credentials = AzureCredentials.from_environment(environ)
        self.container = blob_service(credentials).get_container_client(container)

    def prepare(self) -> None:
        with sdk_errors(f"the container of {self.uri}"):
            if not self.container.exists():
                self.container.create_container()

    def remove(self, name: str) -> None:
        from azure.core.exceptions import ResourceNotFoundError

        with sdk_errors(f"removing {self.uri}/{name}"), contextlib.suppress(ResourceNotFoundError):
            self.container.delete_blob(f"{self.prefix}/{name}")

    def upload(self, name: str, path: Path, on_bytes: Callable[[int], None]) -> None:
        sent = [0]

        def hook(current: int, total: int | None) -> None:
            on_bytes(current - sent[0])
            sent[0] = current

        with sdk_errors(f"the upload of {name} to {self.uri}"), path.open("rb") as data:
            self.container.upload_blob(
                f"{self.prefix}/{name}", data, overwrite=True, max_concurrency=2,
                progress_hook=hook,
            )  # fmt: skip

    def put(self, name: str, data: bytes) -> None:
        with sdk_errors(f"the upload of {name} to {self.uri}"):
            self.container.upload_blob(f"{self.prefix}/{name}", data, overwrite=True)

    def get(self, name: str, missing: str, max_bytes: int) -> bytes:
        blob = self.container.get_blob_client(f"{self.prefix}/{name}")
        with sdk_errors(f"reading {self.uri}/{name}", not_found=missing):
            data: bytes = blob.download_blob(offset=0, length=max_bytes).readall()
            return data
