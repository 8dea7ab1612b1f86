"""Engine fixtures: a storage wrapper that injects failures or stalls uploads."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable

import ebbtide_engine as ebbtide
from ebbtide_engine import storage


class FaultyStore(storage.ObjectStore):
    """Wraps a store; fails or holds chosen puts, as a flaky or slow bucket would.

    - ``fail_puts = n``: the next n create-only puts raise StorageUnavailable;
      with ``after_landing=True`` the put lands first and then fails (the reply
      was lost), which is the ambiguous case retries must handle.
    - ``gate``: while cleared, create-only puts wait (a stalled upload).
    """

    def __init__(self, inner: storage.ObjectStore) -> None:
        self.inner = inner
        self.description = f"faulty({inner.description})"
        self.fail_puts = 0
        self.after_landing = False
        self.failed = 0
        self.gate = asyncio.Event()
        self.gate.set()
        self.puts = 0

    async def put_new(self, key: str, data: bytes) -> storage.ObjectInfo:
        await self.gate.wait()
        self.puts += 1
        if self.fail_puts > 0:
            self.fail_puts -= 1
            self.failed += 1
            if self.after_landing:
                await self.inner.put_new(key, data)
            raise ebbtide.StorageUnavailable(f"injected failure writing {key}")
        return await self.inner.put_new(key, data)

    async def put_if_match(self, key: str, data: bytes, *, etag: str) -> storage.ObjectInfo:
        return await self.inner.put_if_match(key, data, etag=etag)

    async def put_file(
        self,
        key: str,
        path: str | os.PathLike[str],
        *,
        part_size: int = 64 << 20,
        concurrency: int = 4,
        progress: Callable[[int], None] | None = None,
    ) -> storage.ObjectInfo:
        await self.gate.wait()
        return await self.inner.put_file(
            key, path, part_size=part_size, concurrency=concurrency, progress=progress
        )

    async def get(
        self, key: str, *, byte_range: tuple[int, int] | None = None
    ) -> storage.StoredObject:
        return await self.inner.get(key, byte_range=byte_range)

    async def head(self, key: str) -> storage.ObjectInfo:
        return await self.inner.head(key)

    async def list(
        self, prefix: str, *, start_after: str | None = None
    ) -> AsyncIterator[storage.ObjectInfo]:
        async for info in self.inner.list(prefix, start_after=start_after):
            yield info

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def check(self) -> None:
        await self.inner.check()
