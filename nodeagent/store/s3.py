"""AWS S3 (and S3-compatible stores: MinIO, Ceph, R2, moto) as a model store.

Credentials are botocore's, the way S3's users expect them: the standard environment
variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN), a profile
(AWS_PROFILE, ~/.aws), or the instance's or pod's role, in botocore's own order. A custom
endpoint for S3-compatible stores comes from AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL).
Listings, manifests and publishing go through boto3; the bytes of a download go through
llmfleet's own range reader (`nodeagent.store.ranges`), each range signed with SigV4 in
its headers and pinned to the listing's ETag with If-Match.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import quote, urlsplit

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

# Codes S3 answers for credentials it does not take (wrong key, expired token, no rights).
_DENIED = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "403",
}  # fmt: skip
_THROTTLED = {
    "SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "500", "502", "503",
    "504",
}  # fmt: skip
# Publishing: parts of 64 MiB, a few at once (s3transfer's defaults are 8 MiB parts).
_PART_BYTES = 64 * 1024 * 1024


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix` → (`bucket`, `some/prefix`)."""
    return parse_bucket_uri(uri, "s3", "bucket")


def _endpoint(environ: Mapping[str, str]) -> str | None:
    return environ.get("AWS_ENDPOINT_URL_S3") or environ.get("AWS_ENDPOINT_URL") or None


class S3Connection:
    """A boto3 session and S3 client from `environ`: explicit keys where given, else
    botocore's chain (profile, container and instance roles). Path-style addressing at a
    custom endpoint: S3-compatible stores rarely have a DNS name per bucket."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        import boto3
        from botocore.config import Config

        self.endpoint = _endpoint(environ)
        self.config = Config(
            signature_version="s3v4",
            s3={"addressing_style": "path" if self.endpoint else "auto"},
            retries={"mode": "standard", "max_attempts": 3},
            connect_timeout=5,
            read_timeout=30,
        )
        with errors("the S3 configuration"):
            self.session = boto3.session.Session(
                aws_access_key_id=environ.get("AWS_ACCESS_KEY_ID") or None,
                aws_secret_access_key=environ.get("AWS_SECRET_ACCESS_KEY") or None,
                aws_session_token=environ.get("AWS_SESSION_TOKEN") or None,
                region_name=environ.get("AWS_REGION") or environ.get("AWS_DEFAULT_REGION"),
                profile_name=environ.get("AWS_PROFILE") or None,
            )
            self.client = self.session.client("s3", endpoint_url=self.endpoint, config=self.config)
        self.region: str = self.client.meta.region_name or "us-east-1"

    def bucket_endpoint(self, bucket: str) -> tuple[str, str]:
        """(base URL of the bucket's objects, region to sign for). At AWS, the bucket's own
        region (it may not be the configured one: boto3 follows S3's redirects, a plain GET
        does not), and that region's endpoint as botocore resolves it (partitions, FIPS and
        dual-stack settings included). Blocking: a HEAD of the bucket, in a thread."""
        if self.endpoint:  # an S3-compatible store: path-style, the configured region
            return f"{self.endpoint.rstrip('/')}/{bucket}", self.region
        with errors(f"the bucket {bucket}"):
            head = self.client.head_bucket(Bucket=bucket)
            headers = head.get("ResponseMetadata", {}).get("HTTPHeaders", {})
            region = headers.get("x-amz-bucket-region") or self.region
            regional = self.session.client("s3", region_name=region, config=self.config)
        return bucket_base(regional.meta.endpoint_url, bucket), region

    def signed_headers(self, url: str, headers: dict[str, str], region: str) -> dict[str, str]:
        """`headers` plus SigV4's for a GET of `url` (botocore refreshes expiring credentials
        here, which may block: call it in a thread)."""
        from botocore.auth import S3SigV4Auth
        from botocore.awsrequest import AWSRequest

        credentials = self.session.get_credentials()
        if credentials is None:
            raise StoreError(
                "no_credentials",
                "s3:// sources need AWS credentials: AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, a profile (AWS_PROFILE), or an instance role",
                400,
            )
        request = AWSRequest(method="GET", url=url, headers=headers)
        S3SigV4Auth(credentials.get_frozen_credentials(), "s3", region).add_auth(request)
        return dict(request.headers.items())


def bucket_base(regional_endpoint: str, bucket: str) -> str:
    """The bucket's objects at a regional AWS endpoint: virtual-hosted style
    (`https://bucket.s3.eu-west-1.amazonaws.com`), path-style for names with dots, which
    do not match the endpoint's TLS certificate as a host name."""
    parts = urlsplit(regional_endpoint)
    if "." in bucket:
        return f"{parts.scheme}://{parts.netloc}/{bucket}"
    return f"{parts.scheme}://{bucket}.{parts.netloc}"


@contextlib.contextmanager
def errors(what: str, not_found: str = "") -> Iterator[None]:
    """botocore's exceptions inside the block, as StoreErrors that name `what`. Messages
    carry S3's code and text, never a key."""
    import botocore.exceptions as bce

    try:
        yield
    except bce.ClientError as exc:
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        message = f"{what}: {code}: {error.get('Message', '')}".rstrip(": ")
        if code == "NoSuchBucket":
            raise StoreError(
                "bucket_not_found", f"{what}: the bucket does not exist", 404
            ) from None
        if code in ("PreconditionFailed", "412"):  # a read pinned to the listing's ETag
            raise StoreError(
                "blob_changed", f"{what}: changed in the store since it was listed", 409
            ) from None
        if code in ("NoSuchKey", "404"):
            raise StoreError("model_not_found", not_found or f"{what}: not found", 404) from None
        if code in _DENIED:
            raise StoreError("access_denied", f"the store denied {message}", 403) from None
        if code in _THROTTLED:
            raise StoreError("store_unavailable", message, 503, True) from None
        raise StoreError("store_error", message) from None
    except (bce.NoCredentialsError, bce.PartialCredentialsError, bce.ProfileNotFound) as exc:
        raise StoreError("no_credentials", f"{what}: {exc}", 400) from None
    except (bce.ConnectionError, bce.HTTPClientError, bce.ResponseStreamingError,
            bce.IncompleteReadError) as exc:  # fmt: skip
        raise StoreError("store_unreachable", f"{what}: {exc}", 503, True) from None
    except bce.BotoCoreError as exc:
        raise StoreError("store_error", f"{what}: {exc}") from None


class S3Store:
    def __init__(self, uri: str, environ: Mapping[str, str]) -> None:
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.s3 = S3Connection(environ)
        self.client = self.s3.client
        self._endpoint: tuple[str, str] | None = None  # (objects' base URL, region)

    def _list(self) -> dict[str, tuple[int, str]]:
        found: dict[str, tuple[int, str]] = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self.prefix + "/"
        )
        with errors(f"listing {self.uri}"):
            for page in pages:
                for item in page.get("Contents", ()):
                    name = item["Key"].removeprefix(self.prefix + "/")
                    found[name] = (int(item["Size"]), str(item["ETag"]))
        return found

    def _manifest(self, etag: str) -> Manifest:
        with errors(f"reading {self.uri}/{MANIFEST_NAME}"):
            body = self.client.get_object(
                Bucket=self.bucket, Key=f"{self.prefix}/{MANIFEST_NAME}", IfMatch=etag
            )
            return Manifest.from_json(body["Body"].read())

    def _listing(self) -> list[RemoteFile]:
        found = self._list()
        if MANIFEST_NAME not in found:
            raise no_model(self.uri)
        files = join_listing(self._manifest(found[MANIFEST_NAME][1]), found, self.uri)
        self._endpoint = self._endpoint or self.s3.bucket_endpoint(self.bucket)
        return files

    async def listing(self) -> list[RemoteFile]:
        # boto3 blocks (and may ask an instance's metadata service for credentials): a thread.
        return await asyncio.to_thread(self._listing)

    def _signed(self, file: RemoteFile, start: int, end: int) -> tuple[str, dict[str, str]]:
        self._endpoint = self._endpoint or self.s3.bucket_endpoint(self.bucket)
        base, region = self._endpoint
        url = f"{base}/{quote(f'{self.prefix}/{file.path}')}"
        headers = {"Range": f"bytes={start}-{end - 1}", "If-Match": file.etag}
        return url, self.s3.signed_headers(url, headers, region)

    async def read_range(
        self,
        file: RemoteFile,
        start: int,
        end: int,
        buffer: memoryview,
        on_bytes: Callable[[int], None],
    ) -> None:
        url, headers = await asyncio.to_thread(self._signed, file, start, end)
        await read_into(
            url,
            headers,
            buffer,
            file.path,
            lambda status, body: http_status_error(status, file.path, s3_error_code(body)),
            on_bytes,
        )


def s3_error_code(body: str) -> str:
    """S3's error code and message from an error body, without the rest (a signature
    mismatch's body repeats the access key id and the string that was signed)."""
    import re

    code = re.search(r"<Code>([^<]{0,64})</Code>", body)
    message = re.search(r"<Message>([^<]{0,200})</Message>", body)
    return ": ".join(m.group(1) for m in (code, message) if m) or "(no error code)"


class S3Bucket:
    """The blocking side of an S3 store: publishing and reading single files."""

    def __init__(self, uri: str, environ: Mapping[str, str]) -> None:
        self.uri = uri
        self.bucket, self.prefix = parse_s3_uri(uri)
        self.client = S3Connection(environ).client

    def prepare(self) -> None:
        """Check the bucket is there and ours to write: buckets are an operator's to create
        (region, policy, lifecycle), never the publish command's."""
        try:
            with errors(f"the bucket of {self.uri}"):
                self.client.head_bucket(Bucket=self.bucket)
        except StoreError as exc:
            if exc.code != "model_not_found":  # HEAD has no body: S3's code is just "404"
                raise
            raise StoreError(
                "bucket_not_found", f"the bucket of {self.uri}: the bucket does not exist", 404
            ) from None

    def remove(self, name: str) -> None:
        with errors(f"removing {self.uri}/{name}"):
            self.client.delete_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}")

    def upload(self, name: str, path: Path, on_bytes: Callable[[int], None]) -> None:
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_chunksize=_PART_BYTES, max_concurrency=2)
        with errors(f"the upload of {name} to {self.uri}"):
            self.client.upload_file(
                str(path), self.bucket, f"{self.prefix}/{name}", Config=config, Callback=on_bytes
            )

    def put(self, name: str, data: bytes) -> None:
        with errors(f"the upload of {name} to {self.uri}"):
            self.client.put_object(Bucket=self.bucket, Key=f"{self.prefix}/{name}", Body=data)

    def get(self, name: str, missing: str, max_bytes: int) -> bytes:
        with errors(f"reading {self.uri}/{name}", not_found=missing):
            body = self.client.get_object(
                Bucket=self.bucket, Key=f"{self.prefix}/{name}", Range=f"bytes=0-{max_bytes - 1}"
            )
            data: bytes = body["Body"].read()
            return data
