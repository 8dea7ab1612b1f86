"""An in-memory object store, for fast unit tests and the hypothesis models.

It keeps every object in a dict and honours the full contract of
:class:`ObjectStore` (create-only, compare-and-swap, ordered listing), so
the engine behaves exactly as it does against a bucket. Nothing survives the
process: never a storage account for real data.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
import os
from collections.abc import AsyncIterator

from ebbtide_engine import _errors
from ebbtide_engine.storage import _base


def _etag(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


class MemoryStore(_base.ObjectStore):
    """Objects in a dict; keys kept sorted for listing."""

    def __init__(self, name: str = "memory") -> None:
        self.description = f"memory://{name}"
        self._objects: dict[str, bytes] = {}
        self._keys: list[str] = []  # sorted

    def _missing(self, key: str) -> _errors.ObjectNotFound:
        return _errors.ObjectNotFound(f"{self.description}: no object {key!r}")

    def _store(self, key: str, data: bytes) -> _base.ObjectInfo:
        if key not in self._objects:
            bisect.insort(self._keys, key)
        self._objects[key] = bytes(data)
        return _base.ObjectInfo(key=key, size=len(data), etag=_etag(data))

    async def put_new(self, key: str, data: bytes) -> _base.ObjectInfo:
        if key in self._objects:
            raise _errors.ObjectExists(f"{self.description}: {key!r} already exists")
        return self._store(key, data)

    async def put_if_match(self, key: str, data: bytes, *, etag: str) -> _base.ObjectInfo:
        current = self._objects.get(key)
        if current is None or _etag(current) != etag:
            raise _errors.PreconditionFailed(
                f"{self.description}: {key!r} changed since etag {etag!r} was read"
            )
        return self._store(key, data)

    async def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        part_size: int = _base.DEFAULT_PART_SIZE,
        concurrency: int = _base.DEFAULT_CONCURRENCY,
        progress: _base.Progress | None = None,
    ) -> _base.ObjectInfo:
        """Read the file a part at a time (as the others do), then store it whole."""
        _base.check_part_options(part_size, concurrency)
        size = (await asyncio.to_thread(os.stat, path)).st_size
        parts: list[bytes] = []
        done = 0
        while done < size:
            part = await asyncio.to_thread(
                _base.read_range, path, done, min(part_size, size - done)
            )
            parts.append(part)
            done += len(part)
            if progress is not None:
                progress(done)
        if progress is not None and size == 0:
            progress(0)
        return self._store(key, b"".join(parts))

    async def get(
        self, key: str, *, byte_range: tuple[int, int] | None = None
    ) -> _base.StoredObject:
        data = self._objects.get(key)
        if data is None:
            raise self._missing(key)
        part = data if byte_range is None else data[byte_range[0] : byte_range[1]]
        return _base.StoredObject(data=part, etag=_etag(data), size=len(data))

    async def head(self, key: str) -> _base.ObjectInfo:
        data = self._objects.get(key)
        if data is None:
            raise self._missing(key)
        return _base.ObjectInfo(key=key, size=len(data), etag=_etag(data))

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[_base.ObjectInfo]:
        lower = prefix if start_after is None or start_after < prefix else start_after
        index = (
            bisect.bisect_right(self._keys, lower)
            if lower == start_after
            else (bisect.bisect_left(self._keys, lower))
        )
        for key in list(self._keys[index:]):
            if not key.startswith(prefix):
                break
            data = self._objects.get(key)
            if data is not None:
                yield _base.ObjectInfo(key=key, size=len(data), etag=_etag(data))

    async def delete(self, key: str) -> None:
        if self._objects.pop(key, None) is not None:
            self._keys.remove(key)

    def corrupt(self, key: str, data: bytes) -> None:
        """Test hook: replace an object's bytes behind the engine's back."""
        self._store(key, data)
