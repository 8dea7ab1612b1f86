"""A bounded, least-recently-used cache of objects fetched from the bucket, shared by all disks.

A test export fetches journal segments and recovery-disk chunks on demand.
Each object is fetched once while it is in use or fits the budget, however
many reads and connections want it at the same moment: the first asker
starts the fetch, the others await the same one. Values are kept by key with
the size the loader reports; the least recently used are dropped when the
total passes ``capacity``. An object larger than the whole budget is still
returned to its readers, just not kept.

Loaders verify what they fetch (CRC-32C, SHA-256) before returning, so the
cache only ever holds verified bytes. A failed fetch is not cached: the next
read tries again.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

T = TypeVar("T")

Loader = Callable[[], Awaitable[tuple[T, int]]]  # returns (value, size in bytes)


class ObjectCache:
    """Key -> verified value, at most ``capacity`` bytes of them (see the module docstring)."""

    def __init__(self, capacity: int) -> None:
        if capacity < 0:
            raise ValueError(f"cache capacity must not be negative, got {capacity}")
        self.capacity = capacity
        self.used = 0
        self.hits = 0
        self.misses = 0
        self._entries: collections.OrderedDict[str, tuple[Any, int]] = collections.OrderedDict()
        self._loading: dict[str, asyncio.Task[tuple[Any, int]]] = {}
        self._closed = False

    def __contains__(self, key: str) -> bool:
        return key in self._entries or key in self._loading

    async def get(self, key: str, load: Loader[T]) -> T:
        """The value of ``key``: cached, being fetched by someone else, or fetched now."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self.hits += 1
            return cast(T, entry[0])
        self.misses += 1
        task = self._start(key, load)
        # Shielded: one reader giving up (its connection closed) must not cancel
        # the fetch other readers are waiting for.
        value, _size = await asyncio.shield(task)
        return cast(T, value)

    def put(self, key: str, value: object, size: int) -> None:
        """Keep a value fetched elsewhere (the export's planning pass), if it fits."""
        if key not in self and size <= self.capacity and not self._closed:
            self._keep(key, value, size)

    def prefetch(self, key: str, load: Loader[T]) -> None:
        """Start fetching ``key`` in the background unless it is cached or on its way."""
        if key not in self and not self._closed:
            self._start(key, load)

    def _start(self, key: str, load: Loader[T]) -> asyncio.Task[tuple[Any, int]]:
        task = self._loading.get(key)
        if task is None:
            task = asyncio.ensure_future(self._load(key, load))
            self._loading[key] = task
            task.add_done_callback(_retrieve_exception)
        return task

    async def _load(self, key: str, load: Loader[T]) -> tuple[Any, int]:
        try:
            value, size = await load()
        finally:
            del self._loading[key]
        if size <= self.capacity and not self._closed:
            self._keep(key, value, size)
        return value, size

    def _keep(self, key: str, value: object, size: int) -> None:
        self._entries[key] = (value, size)
        self.used += size
        while self.used > self.capacity:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.used -= dropped

    async def close(self) -> None:
        """Cancel the fetches in flight and drop everything."""
        self._closed = True
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self._entries.clear()
        self.used = 0


def _retrieve_exception(task: asyncio.Task[tuple[Any, int]]) -> None:
    # A prefetch nobody awaited may fail; its error is re-raised to the next
    # reader that fetches the object again, not logged as "never retrieved".
    if not task.cancelled():
        task.exception()
