"""Storage accounts: parse a storage-account URL and open the matching backend.

A storage account is named by one URL, so that a CLI flag, a spec field
and a log line all say the same thing:

- ``s3://BUCKET/PREFIX?endpoint=URL&region=R&addressing=path|virtual``
  (S3, MinIO, LocalStack, Ceph RGW; credentials never go in the URL: they
  come from :class:`S3Credentials`, i.e. a Kubernetes Secret, or from the
  usual AWS environment variables);
- ``file:///ABSOLUTE/PATH`` (a local directory, the durable embedded default);
- ``memory://NAME`` (process memory, tests only).
"""

from __future__ import annotations

import dataclasses
import pathlib
import urllib.parse

from ebbtide_engine import _errors
from ebbtide_engine.storage import _base, _local, _memory, _s3


@dataclasses.dataclass(frozen=True, slots=True)
class S3Credentials:
    """Access key pair (and optional session token) for an S3 account."""

    access_key_id: str
    secret_access_key: str = dataclasses.field(repr=False)
    session_token: str | None = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass(frozen=True, slots=True)
class StorageAccount:
    """A parsed storage-account URL. ``url`` never holds secrets."""

    url: str
    scheme: str  # "s3", "file" or "memory"
    bucket: str  # S3 bucket; the directory for file://; the name for memory://
    prefix: str  # "" or ending in "/"
    endpoint_url: str | None = None
    region: str | None = None
    addressing_style: str = "path"

    @classmethod
    def parse(cls, url: str) -> StorageAccount:
        """Parse ``url``; raises ``SpecError`` naming what is wrong with it."""
        parts = urllib.parse.urlsplit(url)
        query = urllib.parse.parse_qs(parts.query, keep_blank_values=True)
        if parts.username or parts.password:
            raise _errors.SpecError(
                f"storage URL {_redact(url)!r} carries credentials; put them in a Secret "
                "(or AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY), never in the URL"
            )
        if parts.scheme == "s3":
            return cls._parse_s3(url, parts, query)
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
                raise _errors.SpecError(
                    f"storage URL {url!r}: a file:// account needs an absolute path, "
                    "like file:///var/lib/ebbtide"
                )
            if query:
                raise _errors.SpecError(f"storage URL {url!r}: file:// takes no query options")
            return cls(url=url, scheme="file", bucket=parts.path, prefix="")
        if parts.scheme == "memory":
            return cls(url=url, scheme="memory", bucket=parts.netloc or "default", prefix="")
        raise _errors.SpecError(
            f"storage URL {_redact(url)!r}: unknown scheme {parts.scheme!r}; "
            "use s3://bucket/prefix?endpoint=..., file:///path or memory://name"
        )

    @classmethod
    def _parse_s3(
        cls, url: str, parts: urllib.parse.SplitResult, query: dict[str, list[str]]
    ) -> StorageAccount:
        bucket = parts.netloc
        if not _valid_bucket(bucket):
            raise _errors.SpecError(
                f"storage URL {url!r}: {bucket!r} is not a valid S3 bucket name "
                "(3-63 characters: lowercase letters, digits, '.', '-')"
            )
        unknown = sorted(set(query) - {"endpoint", "region", "addressing"})
        if unknown:
            raise _errors.SpecError(
                f"storage URL {url!r}: unknown option(s) {', '.join(unknown)}; "
                "known: endpoint, region, addressing"
            )
        endpoint = query.get("endpoint", [None])[0]
        if endpoint is not None and urllib.parse.urlsplit(endpoint).scheme not in ("http", "https"):
            raise _errors.SpecError(
                f"storage URL {url!r}: endpoint {endpoint!r} must be an http:// or https:// URL"
            )
        addressing = query.get("addressing", ["path"])[0]
        if addressing not in ("path", "virtual"):
            raise _errors.SpecError(
                f"storage URL {url!r}: addressing must be 'path' or 'virtual', not {addressing!r}"
            )
        prefix = parts.path.strip("/")
        return cls(
            url=url,
            scheme="s3",
            bucket=bucket,
            prefix=f"{prefix}/" if prefix else "",
            endpoint_url=endpoint,
            region=query.get("region", [None])[0],
            addressing_style=addressing,
        )


def _valid_bucket(name: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789.-")
    return (
        3 <= len(name) <= 63 and set(name) <= allowed and name[0].isalnum() and name[-1].isalnum()
    )


def _redact(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


_memory_stores: dict[str, _memory.MemoryStore] = {}


def open_store(
    account: StorageAccount | str,
    *,
    credentials: S3Credentials | None = None,
    max_attempts: int = 5,
    connect_timeout: float = 5.0,
    read_timeout: float = 60.0,
) -> _base.ObjectStore:
    """Open the backend for ``account``. Cheap: no I/O until first use.

    ``memory://NAME`` returns the same store for the same name within a
    process, so that a "restarted" runtime in a test sees what the first wrote.
    """
    if isinstance(account, str):
        account = StorageAccount.parse(account)
    if account.scheme == "s3":
        return _s3.S3Store(
            bucket=account.bucket,
            prefix=account.prefix,
            endpoint_url=account.endpoint_url,
            region=account.region,
            credentials=(
                None
                if credentials is None
                else (
                    credentials.access_key_id,
                    credentials.secret_access_key,
                    credentials.session_token,
                )
            ),
            addressing_style=account.addressing_style,
            max_attempts=max_attempts,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            description=_redact(account.url),
        )
    if account.scheme == "file":
        return _local.LocalStore(pathlib.Path(account.bucket))
    store = _memory_stores.get(account.bucket)
    if store is None:
        store = _memory_stores[account.bucket] = _memory.MemoryStore(account.bucket)
    return store
