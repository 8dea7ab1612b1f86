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
import os
from collections.abc import AsyncIterator, Callable

#: ``progress(bytes_uploaded_so_far)``, called on the event loop as parts land.
Progress = Callable[[int], None]

#: The defaults of :meth:`ObjectStore.put_file`: at most 256 MiB buffered per upload.
DEFAULT_PART_SIZE = 64 << 20
DEFAULT_CONCURRENCY = 4


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

    async def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        part_size: int = DEFAULT_PART_SIZE,
        concurrency: int = DEFAULT_CONCURRENCY,
        progress: Progress | None = None,
    ) -> ObjectInfo:
        """Store the file at ``path`` as ``key``, streamed: for images of any size.

        An **overwrite**, not create-only: an existing ``key`` is replaced
        (there is no condition on it; the caller owns the key). Atomic like
        the other puts: readers see the old object (or none) until the new
        one is whole. If the upload fails or is cancelled, ``key`` keeps
        what it had (S3: the multipart upload is aborted, so no parts are
        left behind); a cancellation that arrives after the new object was
        published may leave the new object.

        The file is read ``part_size`` bytes at a time by up to
        ``concurrency`` parts at once, so memory is bounded by
        ``part_size * concurrency`` (S3: twice that, as the HTTP stack
        copies each part's body once), whatever the file's size. Backends may
        raise ``part_size`` to their own minimum (S3: 5 MiB, and enough that
        the file fits in 10,000 parts). Holes are uploaded as zeros. The
        file must not change while it is uploaded.

        ``progress``, if given, is called on the event loop with the number
        of bytes uploaded so far, as parts complete (last with the size).
        Storage failures raise the ``StorageError`` subclasses above; a file
        that cannot be read raises its ``OSError`` unchanged; a
        ``part_size`` or ``concurrency`` below 1 raises ``ValueError``.

        Not abstract, so that wrappers written before it existed still
        instantiate; every backend here overrides it, and a wrapper that
        does not raises ``NotImplementedError`` rather than reading a whole
        image into memory.
        """
        raise NotImplementedError(
            f"{type(self).__name__} does not implement put_file; wrap it to forward put_file"
        )

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


def check_part_options(part_size: int, concurrency: int) -> None:
    """Raise ``ValueError`` for a ``put_file`` ``part_size`` or ``concurrency`` below 1."""
    if part_size < 1:
        raise ValueError(f"put_file: part_size must be at least 1 byte, not {part_size}")
    if concurrency < 1:
        raise ValueError(f"put_file: concurrency must be at least 1, not {concurrency}")


def read_range(path: str | os.PathLike[str], offset: int, size: int) -> bytes:
    """``size`` bytes of the file at ``path`` from ``offset`` (blocking; run in a thread).

    Opens and closes the file itself, so a cancelled caller that stops
    waiting for the thread leaves no descriptor behind. Raises ``OSError``
    if the file is shorter than that (it changed while being uploaded).
    """
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        left = size
        while left > 0:
            chunk = os.pread(fd, left, offset + size - left)
            if not chunk:
                raise OSError(
                    f"{os.fspath(path)}: the file shrank while it was being uploaded "
                    f"(nothing at byte {offset + size - left}); it must not change meanwhile"
                )
            chunks.append(chunk)
            left -= len(chunk)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)
    finally:
        os.close(fd)
