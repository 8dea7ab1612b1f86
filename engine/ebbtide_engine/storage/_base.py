"""The object-store interface every storage account backend implements.

Ebbtide needs only a handful of operations from a bucket, and each has a
contract that the engine relies on for correctness (Litestream's
ReplicaClient is the model). Backends: S3 (``_s3``), a local directory
(``_local``, the durable embedded default) and memory (``_memory``, for unit
tests). ``tests/storage/test_contract.py`` runs the same suite against all
of them.

Keys are relative to the storage account's prefix, use ``/`` as separator
and never start with ``/``. Nothing here knows what the objects mean.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import AsyncIterator


@dataclasses.dataclass(frozen=True, slots=True)
class ObjectInfo:
    """What a listing or a head returns about one object."""

    key: str
    size: int
    etag: str


@dataclasses.dataclass(frozen=True, slots=True)
class StoredObject:
    """An object's bytes (or the requested range of them) and its version tag."""

    data: bytes
    etag: str
    size: int  # the whole object's size, even for a ranged get


class ObjectStore(abc.ABC):
    """An async, narrow view of one storage account (bucket + prefix).

    Every method raises a subclass of :class:`ebbtide_engine._errors.StorageError`
    on failure: ``ObjectNotFound``, ``ObjectExists``, ``PreconditionFailed``,
    ``BucketNotFound``, ``AccessDenied`` or ``StorageUnavailable`` (after the
    backend's own retries). Messages name the storage account and the key.
    """

    #: A human-readable name of the account (URL without credentials).
    description: str

    @abc.abstractmethod
    async def put_new(self, key: str, data: bytes) -> ObjectInfo:
        """Create ``key`` with ``data`` only if it does not exist yet.

        Atomic: readers see either no object or the whole of ``data``, never a
        part. If ``key`` exists (even with the same bytes), raises
        ``ObjectExists`` and leaves the existing object untouched. Not
        idempotent by design: a retry after an ambiguous failure may raise
        ``ObjectExists`` for the caller's own write; callers that need to
        tell the two apart compare the stored bytes.
        """

    @abc.abstractmethod
    async def put_if_match(self, key: str, data: bytes, *, etag: str) -> ObjectInfo:
        """Replace ``key`` with ``data`` only if its current etag is ``etag``.

        Atomic compare-and-swap. Raises ``PreconditionFailed`` if the object
        changed (or was deleted) since ``etag`` was read; nothing is written.
        """

    @abc.abstractmethod
    async def get(self, key: str, *, byte_range: tuple[int, int] | None = None) -> StoredObject:
        """Read ``key``, or the half-open range ``[start, end)`` of it.

        Raises ``ObjectNotFound`` if it does not exist. A range past the end
        is clipped to the object (an empty range returns ``b""``).
        """

    @abc.abstractmethod
    async def head(self, key: str) -> ObjectInfo:
        """Size and etag of ``key``; raises ``ObjectNotFound`` if it does not exist."""

    @abc.abstractmethod
    def list(self, prefix: str, *, start_after: str | None = None) -> AsyncIterator[ObjectInfo]:
        """Every object whose key starts with ``prefix``, in ascending key order.

        With ``start_after``, only keys strictly greater than it. Pages are
        fetched lazily. Objects being written are never listed before they
        are whole.
        """

    @abc.abstractmethod
    async def delete(self, key: str) -> None:
        """Remove ``key``. Idempotent: deleting a missing key is not an error."""

    async def check(self) -> None:
        """Verify the account is usable (bucket exists, credentials work).

        Raises ``BucketNotFound``, ``AccessDenied`` or ``StorageUnavailable``
        with a message that says what to fix. The default lists one key.
        """
        async for _ in self.list("", start_after=None):
            break

    async def close(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Release connections. The store must not be used afterwards."""

    async def __aenter__(self) -> ObjectStore:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
