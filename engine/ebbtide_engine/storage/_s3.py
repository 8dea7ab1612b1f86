"""The S3 backend: a storage account in an S3-compatible bucket, via aiobotocore.

This is the only module that imports aiobotocore or botocore (import-linter
enforces it; aiohttp only for the errors it lets through), so the rest of
the engine sees only :class:`ObjectStore` and the errors of
:mod:`ebbtide_engine._errors`. It stores each object at ``PREFIX + key`` in
the bucket, exactly as given, with no metadata of its own.

How the contract maps onto S3 (AWS since 2024, MinIO, LocalStack, moto, Ceph
RGW recent enough to honour conditional writes):

- ``put_new`` is ``PutObject`` with ``If-None-Match: *``; ``put_if_match`` is
  ``PutObject`` with ``If-Match: ETAG``. The server decides atomically; a 412
  means the key was taken (``ObjectExists``) or changed (``PreconditionFailed``),
  and a 404 on ``If-Match`` means it is gone (``PreconditionFailed`` too). A
  409 ``ConditionalRequestConflict`` (a concurrent write to the same key was
  in flight) is retried, up to ``max_attempts``, and then reported as the
  conflict it is.
- Etags are S3's ETag without the quotes (the MD5 hex of a single-part upload).
- ``list`` is ``ListObjectsV2`` with ``Prefix`` and ``StartAfter``, one page
  (``list_page_size`` keys, 1,000 at most) fetched at a time as the caller
  iterates; S3 returns keys in UTF-8 byte order, which is Python's ``str``
  order.
- ``get`` with a range sends ``Range: bytes=START-(END-1)``.
- ``put_file`` (an overwrite) is one unconditional ``PutObject`` for a file
  smaller than a part, else a multipart upload: ``CreateMultipartUpload``
  (``ChecksumAlgorithm=CRC32C``), up to ``concurrency`` ``UploadPart`` at a
  time each with its CRC-32C, ``CompleteMultipartUpload``; on any failure or
  cancellation ``AbortMultipartUpload``, so no parts stay behind. Parts are
  at least 5 MiB (S3's minimum) and at most 10,000; the etag is then S3's
  multipart etag (``MD5-of-part-MD5s-N``).

Retries, timeouts and integrity come from botocore's config: the "standard"
retry mode (exponential backoff with jitter, up to ``max_attempts`` attempts
in all, for throttling, 5xx and connection errors), the given connect and
read timeouts, a pool of 32 connections, and botocore's default
``when_supported`` checksums: each PUT carries the CRC-32C of its body
(ours, hardware-computed, so botocore computes no CRC32 of its own) for the
server to verify (AWS and LocalStack do, moto does not), and responses that
carry a checksum are checked. The payload's SHA-256 is not signed over HTTPS
(botocore's default for uploads) nor over plain HTTP to this machine
(``_loopback``); it is over plain HTTP to another host. botocore does not
retry a body that breaks off after the response began; ``get`` reads it
again, within the same ``max_attempts``.

A retried ``put_new`` whose first attempt did land reports ``ObjectExists``
for the caller's own write (see :meth:`ObjectStore.put_new`); a retried
``put_if_match`` likewise reports ``PreconditionFailed``.

Errors say which account (``description``, the URL without credentials),
which key, and what to do; the secret key and session token never appear in
a message.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import ipaddress
import os
import random
import urllib.parse
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING, Any, NoReturn

import aiobotocore.config
import aiobotocore.session
import aiohttp
import botocore.exceptions
import crc32c

from ebbtide_engine import _errors
from ebbtide_engine.storage import _base

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

_MAX_POOL_CONNECTIONS = 32
_ACCESS_CODES = frozenset(
    {
        "AccessDenied",
        "AccountProblem",
        "AllAccessDisabled",
        "ExpiredToken",
        "InvalidAccessKeyId",
        "InvalidToken",
        "SignatureDoesNotMatch",
        "TokenRefreshRequired",
        "Forbidden",
        "403",
        "401",
    }
)
_BUSY_CODES = frozenset(
    {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout", "503", "500"}
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
# S3's multipart limits: every part but the last at least 5 MiB, at most 10,000 parts.
MIN_PART_SIZE = 5 << 20
MAX_PARTS = 10_000
_PART_ALIGN = 1 << 20  # a part size raised to fit MAX_PARTS is rounded up to whole MiB
_CREDENTIAL_ERRORS = (
    botocore.exceptions.NoCredentialsError,
    botocore.exceptions.PartialCredentialsError,
    botocore.exceptions.CredentialRetrievalError,
)
# What botocore raises when the endpoint cannot be reached or drops the
# connection (aiobotocore wraps most of aiohttp's errors into these).
# A response body that broke off while being read (the request itself succeeded).
# aiobotocore wraps some of these; a short body surfaces as aiohttp's own error.
_BODY_ERRORS = (
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.IncompleteReadError,
    aiohttp.ClientError,
)
_CONNECTION_ERRORS = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    aiohttp.ClientError,
)


class S3Store(_base.ObjectStore):
    """One bucket + prefix on an S3-compatible endpoint.

    Cheap to construct: the aiobotocore client (and its connection pool) is
    created on first use and released by :meth:`close`. ``credentials`` is
    ``(access_key_id, secret_access_key, session_token)``; ``None`` means
    botocore's default chain (``AWS_ACCESS_KEY_ID``…, a profile, a web
    identity token, the instance metadata).
    """

    def __init__(
        self,
        *,
        bucket: str,
        prefix: str,
        endpoint_url: str | None,
        region: str | None,
        credentials: tuple[str, str, str | None] | None,
        addressing_style: str,
        max_attempts: int,
        connect_timeout: float,
        read_timeout: float,
        description: str,
        list_page_size: int = 1000,
    ) -> None:
        if not 1 <= list_page_size <= 1000:
            raise ValueError(f"list_page_size must be 1..1000, not {list_page_size}")
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint_url = endpoint_url
        self.region = region
        self.description = description
        self.max_attempts = max_attempts
        self.list_page_size = list_page_size
        self._credentials = credentials
        self._config = aiobotocore.config.AioConfig(
            # botocore's "max_attempts" here counts retries only; the total is what we mean.
            retries={"mode": "standard", "total_max_attempts": max_attempts},
            s3={
                "addressing_style": "virtual" if addressing_style == "virtual" else "path",
                **({"payload_signing_enabled": False} if _loopback(endpoint_url) else {}),
            },
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=_MAX_POOL_CONNECTIONS,
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_supported",
        )
        self._client: S3Client | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()
        self._aborts: set[asyncio.Future[None]] = set()  # put_file's, outliving a caller

    def __repr__(self) -> str:
        return f"<S3Store {self.description}>"

    # -- the ObjectStore contract --------------------------------------------------

    async def put_new(self, key: str, data: bytes) -> _base.ObjectInfo:
        try:
            etag = await self._conditional_put(key, data, if_match=None)
        except botocore.exceptions.ClientError as exc:
            if _status(exc) == 412 or _code(exc) in ("PreconditionFailed",):
                raise _errors.ObjectExists(f"{self.description}: {key!r} already exists") from None
            if _code(exc) == "ConditionalRequestConflict":
                raise _errors.ObjectExists(
                    f"{self.description}: {key!r} is being written by someone else "
                    f"(409 ConditionalRequestConflict after {self.max_attempts} attempts)"
                ) from None
            self._raise(exc, "put_new", key)
        except Exception as exc:
            self._raise(exc, "put_new", key)
        return _base.ObjectInfo(key=key, size=len(data), etag=etag)

    async def put_if_match(self, key: str, data: bytes, *, etag: str) -> _base.ObjectInfo:
        try:
            new_etag = await self._conditional_put(key, data, if_match=etag)
        except botocore.exceptions.ClientError as exc:
            code = _code(exc)
            if code != "NoSuchBucket" and (
                _status(exc) in (404, 412)
                or code in ("PreconditionFailed", "ConditionalRequestConflict", *_NOT_FOUND_CODES)
            ):
                now = "it does not exist" if _status(exc) == 404 else "it changed"
                raise _errors.PreconditionFailed(
                    f"{self.description}: {key!r} was not replaced: {now} "
                    f"since etag {etag!r} was read"
                ) from None
            self._raise(exc, "put_if_match", key)
        except Exception as exc:
            self._raise(exc, "put_if_match", key)
        return _base.ObjectInfo(key=key, size=len(data), etag=new_etag)

    async def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        part_size: int = _base.DEFAULT_PART_SIZE,
        concurrency: int = _base.DEFAULT_CONCURRENCY,
        progress: _base.Progress | None = None,
    ) -> _base.ObjectInfo:
        """A file smaller than a part is one PutObject; a larger one a multipart upload.

        ``part_size`` is raised to S3's minimum of 5 MiB (:data:`MIN_PART_SIZE`)
        and, for a file that would need more than 10,000 parts, to the whole
        MiB that fits it in 10,000. Each part carries its CRC-32C; the
        upload is aborted on any failure or cancellation.
        """
        _base.check_part_options(part_size, concurrency)
        size = (await asyncio.to_thread(os.stat, path)).st_size  # unreadable: OSError as is
        part_size = part_size_for(size, part_size)
        if size < part_size:
            data = await asyncio.to_thread(_base.read_range, path, 0, size)
            try:
                client = await self._get_client()
                response = await client.put_object(
                    Bucket=self.bucket, Key=self._full(key), Body=data, ChecksumCRC32C=_crc(data)
                )
            except Exception as exc:
                self._raise(exc, "put_file", key)
            if progress is not None:
                progress(size)
            return _base.ObjectInfo(key=key, size=size, etag=_unquote(response["ETag"]))
        try:
            client = await self._get_client()
            create = asyncio.ensure_future(
                client.create_multipart_upload(
                    Bucket=self.bucket, Key=self._full(key), ChecksumAlgorithm="CRC32C"
                )
            )
            try:
                created = await asyncio.shield(create)
            except asyncio.CancelledError:  # the upload may exist by now: abort it when it does
                self._abort_later(self._abort_created(client, key, create))
                raise
        except Exception as exc:
            self._raise(exc, "put_file", key)
        upload_id = created["UploadId"]
        try:
            parts = await self._upload_parts(
                client, key, upload_id, path, size, part_size, concurrency, progress
            )
            try:
                completed = await client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self._full(key),
                    UploadId=upload_id,
                    MultipartUpload={"Parts": parts},  # type: ignore[typeddict-item]
                )
            except Exception as exc:
                self._raise(exc, "put_file", key)
        except BaseException:
            # Failed, or cancelled: no parts may stay behind (they are billed, unlisted).
            # Cancelled again meanwhile: the abort still runs (and close() waits for it).
            await asyncio.shield(self._abort_later(self._abort_upload(client, key, upload_id)))
            raise
        return _base.ObjectInfo(key=key, size=size, etag=_unquote(completed["ETag"]))

    async def _upload_parts(
        self,
        client: S3Client,
        key: str,
        upload_id: str,
        path: str | os.PathLike[str],
        size: int,
        part_size: int,
        concurrency: int,
        progress: _base.Progress | None,
    ) -> list[dict[str, Any]]:
        """Upload every part, ``concurrency`` at a time, each read just before it is sent."""
        count = -(-size // part_size)
        parts: list[dict[str, Any]] = [{} for _ in range(count)]
        numbers = iter(range(1, count + 1))
        done = 0

        async def worker() -> None:
            nonlocal done
            for number in numbers:  # shared: each worker takes the next part
                offset = (number - 1) * part_size
                length = min(part_size, size - offset)
                data = await asyncio.to_thread(_base.read_range, path, offset, length)
                checksum = _crc(data)
                try:
                    response = await client.upload_part(
                        Bucket=self.bucket,
                        Key=self._full(key),
                        UploadId=upload_id,
                        PartNumber=number,
                        Body=data,
                        ChecksumCRC32C=checksum,
                    )
                except Exception as exc:
                    self._raise(exc, "put_file", key)
                del data
                parts[number - 1] = {
                    "PartNumber": number,
                    "ETag": response["ETag"],
                    "ChecksumCRC32C": checksum,
                }
                done += length
                if progress is not None:
                    progress(done)

        workers = [asyncio.ensure_future(worker()) for _ in range(min(concurrency, count))]
        try:
            await asyncio.gather(*workers)
        except BaseException:
            for task in workers:
                task.cancel()
            await asyncio.gather(*workers, return_exceptions=True)
            raise
        return parts

    def _abort_later(self, abort: Coroutine[Any, Any, None]) -> asyncio.Future[None]:
        """Run ``abort`` as a task of its own, which :meth:`close` waits for."""
        task = asyncio.ensure_future(abort)
        self._aborts.add(task)
        task.add_done_callback(self._aborts.discard)
        return task

    async def _abort_created(self, client: S3Client, key: str, create: asyncio.Future[Any]) -> None:
        """Abort the multipart upload ``create`` starts, once (and if) it has started."""
        try:
            created = await create
        except Exception:
            return  # no upload to abort
        await self._abort_upload(client, key, created["UploadId"])

    async def _abort_upload(self, client: S3Client, key: str, upload_id: str) -> None:
        """Abort a multipart upload; failing that, its parts stay until a lifecycle rule."""
        with contextlib.suppress(Exception):
            await client.abort_multipart_upload(
                Bucket=self.bucket, Key=self._full(key), UploadId=upload_id
            )

    async def get(
        self, key: str, *, byte_range: tuple[int, int] | None = None
    ) -> _base.StoredObject:
        if byte_range is not None:
            start, end = byte_range
            if start < 0 or end < 0:
                raise ValueError(f"byte range {byte_range} must not be negative")
            if end <= start:  # nothing to read, but the object must exist
                info = await self.head(key)
                return _base.StoredObject(data=b"", etag=info.etag, size=info.size)
        try:
            client = await self._get_client()
            for attempt in range(1, self.max_attempts + 1):
                if byte_range is None:
                    response = await client.get_object(Bucket=self.bucket, Key=self._full(key))
                else:
                    response = await client.get_object(
                        Bucket=self.bucket,
                        Key=self._full(key),
                        Range=f"bytes={byte_range[0]}-{byte_range[1] - 1}",
                    )
                try:
                    async with response["Body"] as body:
                        data = await body.read()
                    break
                except _BODY_ERRORS:
                    # botocore retries the request, not the reading of its body.
                    if attempt == self.max_attempts:
                        raise
        except botocore.exceptions.ClientError as exc:
            if byte_range is not None and (_code(exc) == "InvalidRange" or _status(exc) == 416):
                info = await self.head(key)  # the range starts past the end: clip to b""
                return _base.StoredObject(data=b"", etag=info.etag, size=info.size)
            self._raise(exc, "get", key)
        except Exception as exc:
            self._raise(exc, "get", key)
        etag = _unquote(response["ETag"])
        partial = response["ResponseMetadata"]["HTTPStatusCode"] == 206
        if partial:
            # "bytes START-END/SIZE"
            size = int(response.get("ContentRange", "").rpartition("/")[2] or len(data))
        else:
            size = len(data)
            if byte_range is not None:  # the server ignored the Range header
                data = data[byte_range[0] : byte_range[1]]
        return _base.StoredObject(data=data, etag=etag, size=size)

    async def head(self, key: str) -> _base.ObjectInfo:
        # A HEAD has no body, so a missing bucket also answers a bare 404 here:
        # it reads as ObjectNotFound; check() and the other calls tell them apart.
        try:
            client = await self._get_client()
            response = await client.head_object(Bucket=self.bucket, Key=self._full(key))
        except Exception as exc:
            self._raise(exc, "head", key)
        return _base.ObjectInfo(
            key=key, size=response["ContentLength"], etag=_unquote(response["ETag"])
        )

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[_base.ObjectInfo]:
        kwargs: dict[str, Any] = {
            "Bucket": self.bucket,
            "Prefix": self._full(prefix),
            "PaginationConfig": {"PageSize": self.list_page_size},
        }
        if start_after is not None:
            kwargs["StartAfter"] = self._full(start_after)
        strip = len(self.prefix)
        try:
            client = await self._get_client()
            async for page in client.get_paginator("list_objects_v2").paginate(**kwargs):
                for item in page.get("Contents", []):
                    yield _base.ObjectInfo(
                        key=item["Key"][strip:], size=item["Size"], etag=_unquote(item["ETag"])
                    )
        except Exception as exc:
            self._raise(exc, "list", prefix)

    async def delete(self, key: str) -> None:
        try:
            client = await self._get_client()
            await client.delete_object(Bucket=self.bucket, Key=self._full(key))
        except botocore.exceptions.ClientError as exc:
            if _code(exc) in _NOT_FOUND_CODES:
                return  # some servers answer 404 for a missing key: already deleted
            self._raise(exc, "delete", key)
        except Exception as exc:
            self._raise(exc, "delete", key)

    async def check(self) -> None:
        try:
            client = await self._get_client()
            await client.head_bucket(Bucket=self.bucket)
        except Exception as exc:
            self._raise(exc, "check", None)

    async def close(self) -> None:
        if self._aborts:  # a put_file cancelled twice: let its abort reach the server
            await asyncio.gather(*self._aborts, return_exceptions=True)
        async with self._client_lock:
            stack, self._exit_stack, self._client = self._exit_stack, None, None
            if stack is not None:
                await stack.aclose()

    # -- internals ---------------------------------------------------------------------

    def _full(self, key: str) -> str:
        return self.prefix + key

    async def _get_client(self) -> S3Client:
        if self._client is not None:
            return self._client
        async with self._client_lock:
            if self._client is None:
                access_key, secret_key, token = self._credentials or (None, None, None)
                stack = contextlib.AsyncExitStack()
                session = aiobotocore.session.get_session()
                session.register_component("data_loader", _data_loader())
                self._client = await stack.enter_async_context(
                    session.create_client(
                        "s3",
                        region_name=self.region,
                        endpoint_url=self.endpoint_url,
                        aws_access_key_id=access_key,
                        aws_secret_access_key=secret_key,
                        aws_session_token=token,
                        config=self._config,
                    )
                )
                self._exit_stack = stack
            return self._client

    async def _conditional_put(self, key: str, data: bytes, *, if_match: str | None) -> str:
        """PutObject, create-only or if-match; retries a 409 ConditionalRequestConflict."""
        client = await self._get_client()
        # Our own CRC-32C (hardware, ~15 GB/s) for the server to verify: botocore
        # then computes no CRC32 of its own (about 1 s of CPU per GiB here).
        checksum = base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()
        for attempt in range(1, self.max_attempts + 1):
            try:
                if if_match is None:
                    response = await client.put_object(
                        Bucket=self.bucket,
                        Key=self._full(key),
                        Body=data,
                        IfNoneMatch="*",
                        ChecksumCRC32C=checksum,
                    )
                else:
                    response = await client.put_object(
                        Bucket=self.bucket,
                        Key=self._full(key),
                        Body=data,
                        IfMatch=f'"{if_match}"',
                        ChecksumCRC32C=checksum,
                    )
            except botocore.exceptions.ClientError as exc:
                if _code(exc) != "ConditionalRequestConflict" or attempt == self.max_attempts:
                    raise
                await asyncio.sleep(random.uniform(0, min(1.0, 0.05 * 2**attempt)))
                continue
            return _unquote(response["ETag"])
        raise AssertionError("unreachable")  # pragma: no cover

    def _endpoint(self) -> str:
        if self.endpoint_url:
            return self.endpoint_url
        return f"AWS S3 ({self.region or 'default region'})"

    def _raise(self, exc: Exception, op: str, key: str | None) -> NoReturn:
        """Re-raise ``exc`` as the StorageError the contract promises."""
        if isinstance(exc, _errors.EbbtideError | ValueError):
            raise exc
        raise self._translate(exc, op, key) from exc

    def _translate(self, exc: Exception, op: str, key: str | None) -> _errors.StorageError:
        where = self.description if key is None else f"{self.description}: {key!r}"
        endpoint = self._endpoint()
        if isinstance(exc, botocore.exceptions.ClientError):
            code, status = _code(exc), _status(exc)
            detail = self._scrub(f"{code}: {_message(exc)}" if _message(exc) else code)
            if code == "NoSuchBucket" or (key is None and status == 404):
                return _errors.BucketNotFound(
                    f"bucket {self.bucket!r} does not exist at {endpoint}: create it or fix "
                    f"the storage account ({self.description})"
                )
            if code in _NOT_FOUND_CODES or status == 404:
                return _errors.ObjectNotFound(f"{where}: no object")
            if code in _ACCESS_CODES or status in (401, 403):
                return _errors.AccessDenied(
                    f"{where}: {op} refused by {endpoint} ({detail}); check the credentials "
                    "Secret (access key id and secret key) and the bucket's policy"
                )
            if code in ("PermanentRedirect", "AuthorizationHeaderMalformed", "301"):
                return _errors.StorageError(
                    f"{where}: {op} refused by {endpoint} ({detail}): the bucket is in "
                    "another region; set region= in the storage URL"
                )
            if code in _BUSY_CODES or status >= 500:
                return _errors.StorageUnavailable(
                    f"{where}: {endpoint} kept failing after {self.max_attempts} attempts "
                    f"({op}: HTTP {status} {detail}); check the storage service"
                )
            return _errors.StorageError(
                f"{where}: {op} failed at {endpoint}: HTTP {status} {detail}"
            )
        if isinstance(exc, _CREDENTIAL_ERRORS):
            return _errors.AccessDenied(
                f"{where}: no usable credentials for {endpoint} ({self._scrub(str(exc))}); "
                "give the storage account a credentials Secret, or set AWS_ACCESS_KEY_ID "
                "and AWS_SECRET_ACCESS_KEY"
            )
        if isinstance(exc, _CONNECTION_ERRORS):
            return _errors.StorageUnavailable(
                f"cannot reach {endpoint}: {self._scrub(str(exc))} ({where}, {op}, "
                f"{self.max_attempts} attempts); check the endpoint URL and the network"
            )
        return _errors.StorageError(
            f"{where}: {op} failed at {endpoint}: {type(exc).__name__}: {self._scrub(str(exc))}"
        )

    def _scrub(self, text: str) -> str:
        """``text`` with the secret key and session token masked, just in case."""
        if self._credentials is not None:
            for secret in self._credentials[1:]:
                if secret and len(secret) >= 8:  # shorter ones are no secret, and mask too much
                    text = text.replace(secret, "***")
        return text


@functools.cache
def _data_loader() -> Any:
    """botocore's loader of service models, shared by every store's session.

    Parsing S3's model takes ~0.15 s; with the loader's cache shared, a new
    client takes ~0.01 s. Sessions stay per store, so each still resolves its
    own credentials.
    """
    return aiobotocore.session.get_session().get_component("data_loader")


def _loopback(endpoint_url: str | None) -> bool:
    """Whether requests go over plain HTTP to this machine itself (127.0.0.0/8, ::1, localhost).

    SigV4 then signs the payload's SHA-256 by default (botocore does not over
    HTTPS, where TLS protects the body): about 0.9 s of CPU per GiB uploaded.
    Over loopback no network attacker can alter a body in flight, and the
    CRC-32C we send with each PUT still covers it against corruption, so the
    payload goes unsigned (``UNSIGNED-PAYLOAD``), as over HTTPS. Plain HTTP
    to another host keeps the signed payload: there the SHA-256 is the only
    thing that ties the body to the signature.
    """
    if not endpoint_url:
        return False
    parts = urllib.parse.urlsplit(endpoint_url)
    if parts.scheme != "http" or not parts.hostname:
        return False
    if parts.hostname == "localhost":
        return True
    try:
        return ipaddress.ip_address(parts.hostname).is_loopback
    except ValueError:
        return False


def part_size_for(size: int, part_size: int) -> int:
    """The part size put_file uses for a file of ``size`` bytes: S3's limits applied.

    At least :data:`MIN_PART_SIZE`; if the file would need more than
    :data:`MAX_PARTS` parts, the smallest whole MiB that fits it in that many.
    """
    part_size = max(part_size, MIN_PART_SIZE)
    if size > part_size * MAX_PARTS:
        part_size = -(-size // (MAX_PARTS * _PART_ALIGN)) * _PART_ALIGN
    return part_size


def _crc(data: bytes) -> str:
    """The base64 CRC-32C S3 takes in ``ChecksumCRC32C`` (hardware-computed)."""
    return base64.b64encode(crc32c.crc32c(data).to_bytes(4, "big")).decode()


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _unquote(etag: str) -> str:
    return etag.strip('"')
