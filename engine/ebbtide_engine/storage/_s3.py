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

Retries, timeouts and integrity come from botocore's config: the "standard"
retry mode (exponential backoff with jitter, up to ``max_attempts`` attempts
in all, for throttling, 5xx and connection errors), the given connect and
read timeouts, a pool of 32 connections, and botocore's default
``when_supported`` checksums: a CRC32 sent with each PUT for the server to
verify (AWS and LocalStack do, moto does not) and checked on responses that
carry one. botocore does not retry a body that breaks off after the response
began; ``get`` reads it again, within the same ``max_attempts``.

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
import random
from collections.abc import AsyncIterator
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
            s3={"addressing_style": "virtual" if addressing_style == "virtual" else "path"},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            max_pool_connections=_MAX_POOL_CONNECTIONS,
            request_checksum_calculation="when_supported",
            response_checksum_validation="when_supported",
        )
        self._client: S3Client | None = None
        self._exit_stack: contextlib.AsyncExitStack | None = None
        self._client_lock = asyncio.Lock()

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


def _code(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _message(exc: botocore.exceptions.ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Message", ""))


def _status(exc: botocore.exceptions.ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))


def _unquote(etag: str) -> str:
    return etag.strip('"')
