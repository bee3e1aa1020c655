"""Google Cloud Storage as a model store.

Credentials the way GCS's users expect them: a service-account (or any credentials) file
named by GOOGLE_APPLICATION_CREDENTIALS, else Application Default Credentials (gcloud's
login, or the metadata server on GCE and GKE). STORAGE_EMULATOR_HOST points at an
emulator instead, anonymously unless a credentials file is given too. Listings and the
manifest are JSON API calls on the agent's aiohttp session; the bytes of a download go
through llmfleet's own range reader (`nodeagent.store.ranges`) with a bearer token, each
read pinned to the listing's generation. Publishing uses google-cloud-storage (resumable
uploads).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import quote

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

GCS_ENDPOINT = "https://storage.googleapis.com"
READ_SCOPE = "https://www.googleapis.com/auth/devstorage.read_only"
WRITE_SCOPE = "https://www.googleapis.com/auth/devstorage.read_write"
_LIST_TIMEOUT = aiohttp.ClientTimeout(total=60, sock_connect=5)
# Resumable uploads in chunks of 64 MiB (a multiple of 256 KiB, as GCS asks).
_CHUNK_BYTES = 64 * 1024 * 1024


def parse_gcs_uri(uri: str) -> tuple[str, str]:
    """`gs://bucket/some/prefix` → (`bucket`, `some/prefix`)."""
    return parse_bucket_uri(uri, "gs", "bucket")


@contextlib.contextmanager
def auth_errors(what: str) -> Iterator[None]:
    """google-auth's exceptions inside the block, as StoreErrors naming `what`."""
    import google.auth.exceptions as gae

    try:
        yield
    except gae.DefaultCredentialsError as exc:
        raise StoreError(
            "no_credentials",
            f"{what}: no Google credentials: set GOOGLE_APPLICATION_CREDENTIALS to a "
            f"service-account file, or log in with gcloud ({exc})",
            400,
        ) from None
    except gae.RefreshError as exc:
        raise StoreError(
            "access_denied", f"{what}: the credentials could not get an access token: {exc}", 403
        ) from None
    except gae.TransportError as exc:
        raise StoreError("store_unreachable", f"{what}: {exc}", 503, True) from None


def _from_file(path: str, scope: str) -> tuple[Any, str | None]:
    """The credentials in a key file: a service account's key, gcloud's
    `application-default login` (authorized_user), or another kind google-auth takes."""
    import json

    from google.oauth2 import credentials, service_account

    try:
        info = json.loads(Path(path).read_text())
        kind = info.get("type") if isinstance(info, dict) else None
    except (OSError, ValueError) as exc:
        raise StoreError(
            "no_credentials", f"GOOGLE_APPLICATION_CREDENTIALS={path} cannot be read: {exc}", 400
        ) from None
    try:
        if kind == "service_account":
            found = service_account.Credentials.from_service_account_info(  # type: ignore[no-untyped-call]
                info, scopes=[scope]
            )
            return found, info.get("project_id")
        if kind == "authorized_user":
            user = credentials.Credentials.from_authorized_user_info(  # type: ignore[no-untyped-call]
                info, scopes=[scope]
            )
            return user, info.get("quota_project_id")
    except (ValueError, KeyError) as exc:
        raise StoreError(
            "no_credentials", f"GOOGLE_APPLICATION_CREDENTIALS={path} is not usable: {exc}", 400
        ) from None
    # Workload identity federation (external_account: an agent on AWS or Azure reading a GCS
    # mirror) and impersonation: google-auth's general loader. It warns about files from
    # untrusted sources; this one is the operator's own configuration.
    import warnings

    import google.auth

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loaded: tuple[Any, str | None] = google.auth.load_credentials_from_file(  # type: ignore[no-untyped-call]
                path, scopes=[scope]
            )
        except google.auth.exceptions.DefaultCredentialsError as exc:
            raise StoreError(
                "no_credentials",
                f"GOOGLE_APPLICATION_CREDENTIALS={path} (type {kind!r}) is not usable: {exc}",
                400,
            ) from None
    return loaded


class GcsAuth:
    """Credentials and the endpoint from `environ`; hands out a current bearer token."""

    def __init__(self, environ: Mapping[str, str], scope: str) -> None:
        emulator = environ.get("STORAGE_EMULATOR_HOST", "").rstrip("/")
        if emulator and "://" not in emulator:
            emulator = f"http://{emulator}"
        self.endpoint = emulator or GCS_ENDPOINT
        self.project = environ.get("GOOGLE_CLOUD_PROJECT") or None
        self._lock = threading.Lock()
        key_file = environ.get("GOOGLE_APPLICATION_CREDENTIALS", "")
        with auth_errors("the Google credentials"):
            import google.auth
            from google.auth.credentials import AnonymousCredentials

            if key_file:
                self.credentials, project = _from_file(key_file, scope)
            elif emulator:
                self.credentials, project = AnonymousCredentials(), None  # type: ignore[no-untyped-call]
            else:
                self.credentials, project = google.auth.default(scopes=[scope])
        self.project = self.project or project

    @property
    def anonymous(self) -> bool:
        from google.auth.credentials import AnonymousCredentials

        return isinstance(self.credentials, AnonymousCredentials)

    def headers(self) -> dict[str, str]:
        """The Authorization header, refreshing the token when it is due (blocking: a thread)."""
        if self.anonymous:
            return {}
        with self._lock, auth_errors("the Google credentials"):
            if not self.credentials.valid:
                from google.auth.transport.requests import Request

                self.credentials.refresh(Request())
            return {"Authorization": f"Bearer {self.credentials.token}"}


class GcsStore:
    def __init__(
        self, uri: str, session: aiohttp.ClientSession, environ: Mapping[str, str]
    ) -> None:
        self.uri = uri
        self.session = session
        self.bucket, self.prefix = parse_gcs_uri(uri)
        self.auth = GcsAuth(environ, READ_SCOPE)
        self._objects = f"{self.auth.endpoint}/storage/v1/b/{quote(self.bucket, safe='')}/o"
        self._media = f"{self.auth.endpoint}/download/storage/v1/b/{quote(self.bucket, safe='')}/o"

    def _media_url(self, path: str, generation: str = "") -> str:
        url = f"{self._media}/{quote(f'{self.prefix}/{path}', safe='')}?alt=media"
        # Pinned: a rewritten object is a new generation, and this one answers 404 (or,
        # with ifGenerationMatch, 412) rather than other bytes.
        pin = f"&generation={generation}&ifGenerationMatch={generation}"
        return url + (pin if generation else "")

    async def _get(self, url: str, what: str, not_found: StoreError | None = None) -> bytes:
        headers = await asyncio.to_thread(self.auth.headers)
        try:
            async with self.session.get(url, headers=headers, timeout=_LIST_TIMEOUT) as response:
                body = await response.read()
                if response.status == 404 and not_found is not None:
                    raise not_found
                if response.status != 200:
                    raise http_status_error(response.status, what, body.decode(errors="replace"))
                return body
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise StoreError(
                "store_unreachable", f"the store did not answer for {what}: {exc!r}", 503, True
            ) from None

    async def _list(self) -> dict[str, tuple[int, str]]:
        import json

        found: dict[str, tuple[int, str]] = {}
        token = ""
        missing = StoreError("bucket_not_found", f"{self.uri}: the bucket does not exist", 404)
        while True:
            query = f"prefix={quote(self.prefix + '/', safe='')}"
            if token:
                query += f"&pageToken={quote(token, safe='')}"
            body = await self._get(f"{self._objects}?{query}", self.uri, missing)
            try:
                page = json.loads(body)
                for item in page.get("items", ()):
                    name = str(item["name"]).removeprefix(self.prefix + "/")
                    found[name] = (int(item["size"]), str(item["generation"]))
                token = page.get("nextPageToken") or ""
            except (ValueError, KeyError, TypeError, AttributeError) as exc:
                raise StoreError(
                    "store_error", f"{self.uri}: the store's listing cannot be read: {exc!r}"
                ) from None
            if not token:
                return found

    async def listing(self) -> list[RemoteFile]:
        found = await self._list()
        if MANIFEST_NAME not in found:
            raise no_model(self.uri)
        manifest = Manifest.from_json(
            await self._get(self._media_url(MANIFEST_NAME, found[MANIFEST_NAME][1]), MANIFEST_NAME)
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
        headers = await asyncio.to_thread(self.auth.headers)
        headers["Range"] = f"bytes={start}-{end - 1}"

        def status_error(status: int, body: str) -> StoreError:
            if status == 404:  # that generation is gone: the object was rewritten or deleted
                status = 412
            return http_status_error(status, file.path, body)

        await read_into(
            self._media_url(file.path, file.etag), headers, buffer, file.path, status_error,
            on_bytes,
        )  # fmt: skip


@contextlib.contextmanager
def client_errors(what: str, not_found: str = "") -> Iterator[None]:
    """google-cloud-storage's exceptions inside the block, as StoreErrors naming `what`."""
    import requests
    from google.api_core import exceptions as gce

    try:
        with auth_errors(what):
            yield
    except gce.NotFound:
        raise StoreError("model_not_found", not_found or f"{what}: not found", 404) from None
    except (gce.Forbidden, gce.Unauthorized) as exc:
        raise StoreError("access_denied", f"the store denied {what}: {exc.message}", 403) from None
    except (gce.TooManyRequests, gce.ServerError) as exc:
        raise StoreError("store_unavailable", f"{what}: {exc.message}", 503, True) from None
    except gce.GoogleAPICallError as exc:
        raise StoreError("store_error", f"{what}: {exc.message}") from None
    except requests.ConnectionError as exc:
        raise StoreError("store_unreachable", f"{what}: {exc}", 503, True) from None


class _Counted:
    """A file object that reports the bytes read from it (google-cloud-storage has no
    progress callback)."""

    def __init__(self, file: BinaryIO, on_bytes: Callable[[int], None]) -> None:
        self.file, self.on_bytes = file, on_bytes

    def read(self, size: int = -1) -> bytes:
        data = self.file.read(size)
        self.on_bytes(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


class GcsBucket:
    """The blocking side of a GCS store: publishing and reading single files."""

    def __init__(self, uri: str, environ: Mapping[str, str]) -> None:
        from google.cloud import storage

        self.uri = uri
        self.name, self.prefix = parse_gcs_uri(uri)
        auth = GcsAuth(environ, WRITE_SCOPE)
        with client_errors("the GCS client"):
            client = storage.Client(
                project=auth.project or "-", credentials=auth.credentials,
                client_options={"api_endpoint": auth.endpoint},
            )  # fmt: skip
        self.bucket = client.bucket(self.name)

    def prepare(self) -> None:
        with client_errors(f"the bucket of {self.uri}"):
            if not self.bucket.exists():
                raise StoreError("bucket_not_found", f"{self.uri}: the bucket does not exist", 404)

    def remove(self, name: str) -> None:
        from google.api_core.exceptions import NotFound

        with client_errors(f"removing {self.uri}/{name}"), contextlib.suppress(NotFound):
            self.bucket.blob(f"{self.prefix}/{name}").delete()

    def upload(self, name: str, path: Path, on_bytes: Callable[[int], None]) -> None:
        blob = self.bucket.blob(f"{self.prefix}/{name}", chunk_size=_CHUNK_BYTES)
        size = path.stat().st_size
        with client_errors(f"the upload of {name} to {self.uri}"), path.open("rb") as data:
            blob.upload_from_file(_Counted(data, on_bytes), size=size, rewind=False)

    def put(self, name: str, data: bytes) -> None:
        with client_errors(f"the upload of {name} to {self.uri}"):
            self.bucket.blob(f"{self.prefix}/{name}").upload_from_string(data)

    def get(self, name: str, missing: str, max_bytes: int) -> bytes:
        with client_errors(f"reading {self.uri}/{name}", not_found=missing):
            data: bytes = self.bucket.blob(f"{self.prefix}/{name}").download_as_bytes(
                start=0, end=max_bytes - 1
            )
            return data
