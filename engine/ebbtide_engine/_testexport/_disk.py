"""One disk of a test export: an NBD backend that reads through three layers and writes to scratch.

A read of ``[offset, offset + length)`` is answered, byte range by byte range,
from the first layer that holds it:

1. the **scratch overlay**: what the test VMs wrote, trimmed or zeroed (a
   sparse local file, ``_nbd.FileBackend``, plus the ``RangeSet`` of ranges it
   owns);
2. the **journal** above the promoted LSN up to the checkpoint
   (``JournalExtents``: the last row that touched each byte; a write's bytes
   come from its segment, a trim or write-zeroes reads as zeros);
3. the **recovery disk** at the promoted LSN: its chunk, fetched and verified
   against the SHA-256 in its name;
4. zeros (a chunk the map lacks, a disk that did not exist at the promoted LSN).

Every object a read needs is fetched at once, in parallel, through the
export's shared ``ObjectCache``; a sequential stream of reads also fetches the
next chunks ahead. Writes never reach the bucket. FLUSH and FUA succeed at
once: the overlay is scratch, deleted when the export closes, so there is no
durability to promise (an export that dies loses its overlay by design).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np

from ebbtide_engine import _errors, _format, _keys, _mirror, _nbd
from ebbtide_engine._testexport import _cache, _extents
from ebbtide_engine.storage import _base

logger = logging.getLogger("ebbtide.testexport")

#: At most this many chunks are fetched ahead of a sequential reader.
READAHEAD_CHUNKS = 8


@dataclasses.dataclass(slots=True)
class Counters:
    """What the export did so far (one instance per export, shared by its disks)."""

    bytes_fetched: int = 0
    reads: int = 0
    writes: int = 0


class Objects:
    """Fetches the bucket objects an export reads, verified, through the shared cache."""

    def __init__(
        self,
        store: _base.ObjectStore,
        layout: _keys.VpgLayout,
        cache: _cache.ObjectCache,
        counters: Counters,
    ) -> None:
        self.store = store
        self.layout = layout
        self.cache = cache
        self.counters = counters
        self.segments: list[_mirror.PlannedSegment] = []
        #: ``previous_lsn`` each planned segment had when it was planned and verified
        self.previous: list[int] = []

    async def fetch(self, key: str) -> bytes:
        data = (await self.store.get(key)).data
        self.counters.bytes_fetched += len(data)
        return data

    def segment_key(self, index: int) -> str:
        return self.segments[index].key

    async def segment_rows(self, index: int) -> _format.JournalRows:
        """The rows of planned segment ``index`` (re-fetched and re-verified if evicted)."""
        item = self.segments[index]

        async def load() -> tuple[_format.JournalRows, int]:
            body = await self.fetch(item.key)
            # The chain was verified while planning; the segment must still be the one
            # planned (same name, content and predecessor).
            check = _mirror.ChainCheck()
            check.last[(item.vm, item.name.epoch)] = self.previous[index]
            segment = await asyncio.to_thread(check.decode, item, body)
            return segment.rows, rows_size(segment.rows)

        return await self.cache.get(item.key, load)

    def chunk_loader(self, vm: str, disk: str, digest: bytes) -> _cache.Loader[bytes]:
        async def load() -> tuple[bytes, int]:
            data = await _mirror.read_chunk(self.store, self.layout, vm, disk, digest)
            self.counters.bytes_fetched += len(data)
            return data, len(data)

        return load

    async def chunk(self, vm: str, disk: str, digest: bytes) -> bytes:
        key = self.layout.mirror_chunk(vm, disk, digest)
        return await self.cache.get(key, self.chunk_loader(vm, disk, digest))

    def prefetch_chunk(self, vm: str, disk: str, digest: bytes) -> None:
        key = self.layout.mirror_chunk(vm, disk, digest)
        self.cache.prefetch(key, self.chunk_loader(vm, disk, digest))


def rows_size(rows: _format.JournalRows) -> int:
    """Bytes a decoded segment holds in memory (its data plus the row columns)."""
    return rows.data.nbytes + rows.lsn.nbytes * 4 + rows.op.nbytes + rows.disk.nbytes


@dataclasses.dataclass(frozen=True, slots=True)
class DiskJournal:
    """The journal rows of one disk, in LSN order, and the extent map built from them.

    Row ``i`` is a write (``op[i]``) whose byte for disk offset ``x`` is byte
    ``base[i] + x`` of the data of planned segment ``segment[i]``, or a trim
    or write-zeroes (reads as zeros).
    """

    op: np.ndarray[Any, np.dtype[np.uint8]]
    segment: np.ndarray[Any, np.dtype[np.int64]]
    base: np.ndarray[Any, np.dtype[np.int64]]
    extents: _extents.JournalExtents


@dataclasses.dataclass(frozen=True, slots=True)
class _Copy:
    """A piece of a read: ``length`` bytes to ``target`` from ``source`` at ``position``."""

    target: int
    length: int
    source: str  # cache key; "" for the overlay file
    position: int


class ExportDisk:
    """The ExportBackend of one disk of a test export (see the module docstring)."""

    def __init__(
        self,
        *,
        objects: Objects,
        vm: str,
        disk: str,
        size: int,
        mirror: _format.MirrorMap | None,
        journal: DiskJournal,
        overlay_path: str | os.PathLike[str],
    ) -> None:
        self.vm = vm
        self.disk = disk
        self._size = size
        self._objects = objects
        self._counters = objects.counters
        self._mirror = mirror
        self._journal = journal
        self._overlay = _nbd.FileBackend(overlay_path, size=size)
        self.written = _extents.RangeSet()
        self._sequential_at = -1  # where the previous read ended
        chunk_size = mirror.chunk_size if mirror is not None else _mirror.DEFAULT_CHUNK_SIZE
        self._readahead = max(0, min(READAHEAD_CHUNKS, objects.cache.capacity // (4 * chunk_size)))

    # --- ExportBackend -----------------------------------------------------------

    @property
    def size(self) -> int:
        return self._size

    @property
    def read_only(self) -> bool:
        return False

    async def read(self, offset: int, length: int) -> bytes:
        self._counters.reads += 1
        try:
            return await self._read(offset, length)
        except (_errors.EbbtideError, OSError) as exc:
            logger.error(
                "test export %s/%s: read at %d+%d failed: %s",
                self.vm,
                self.disk,
                offset,
                length,
                exc,
            )
            raise _nbd.NbdError(_nbd.Errno.EIO, str(exc)) from exc

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        self._counters.writes += 1
        await self._overlay.write(offset, data, fua=False)
        self.written.add(offset, offset + len(data))

    async def flush(self) -> None:
        """Nothing to do: the overlay is scratch (see the module docstring)."""

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        self._counters.writes += 1
        await self._overlay.trim(offset, length, fua=False)
        self.written.add(offset, offset + length)

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        self._counters.writes += 1
        await self._overlay.write_zeroes(offset, length, fua=False, may_trim=may_trim)
        self.written.add(offset, offset + length)

    async def disconnected(self) -> None:
        """Nothing to do: the overlay stays for the next connection."""

    def close(self) -> None:
        self._overlay.close()

    # --- reading -----------------------------------------------------------------

    async def _read(self, offset: int, length: int) -> bytes:
        end = offset + length
        copies: list[_Copy] = []
        loads: dict[str, Callable[[], Awaitable[Any]]] = {}
        last_chunk = -1
        for start, stop, inside in self.written.pieces(offset, end):
            if inside:
                copies.append(_Copy(start - offset, stop - start, "", start))
                continue
            for piece_start, piece_end, row in self._journal.extents.pieces(start, stop):
                if row >= 0:
                    if self._journal.op[row] == _format.OP_WRITE:
                        index = int(self._journal.segment[row])
                        key = self._objects.segment_key(index)
                        if key not in loads:
                            loads[key] = functools.partial(self._objects.segment_rows, index)
                        position = int(self._journal.base[row]) + piece_start
                        copies.append(
                            _Copy(piece_start - offset, piece_end - piece_start, key, position)
                        )
                    continue  # trimmed or zeroed: the buffer is zeros already
                last_chunk = self._plan_chunks(piece_start, piece_end, offset, copies, loads)
        keys = list(loads)
        values = await asyncio.gather(*(loads[key]() for key in keys))
        fetched = dict(zip(keys, values, strict=True))
        if offset == self._sequential_at and last_chunk >= 0:
            self._read_ahead(last_chunk)
        self._sequential_at = end
        pieces = []
        for copy in copies:
            if not copy.source:
                data: bytes | memoryview = await self._overlay.read(copy.position, copy.length)
                position = 0
            else:
                value = fetched[copy.source]
                data = value.data if isinstance(value, _format.JournalRows) else value
                position = copy.position
            pieces.append(data[position : position + copy.length])
        if len(copies) == 1 and len(pieces[0]) == length:
            return bytes(pieces[0])  # the common case: one source, one copy
        buffer = bytearray(length)  # zeros where nothing is copied
        for copy, piece in zip(copies, pieces, strict=True):
            buffer[copy.target : copy.target + len(piece)] = piece  # a short last chunk: zeros
        return bytes(buffer)

    def _plan_chunks(
        self,
        start: int,
        end: int,
        offset: int,
        copies: list[_Copy],
        loads: dict[str, Callable[[], Awaitable[Any]]],
    ) -> int:
        """Add the chunk pieces of ``[start, end)``; returns the last chunk index it touches."""
        mirror = self._mirror
        if mirror is None:
            return -1
        size = mirror.chunk_size
        for index in range(start // size, (end - 1) // size + 1):
            digest = mirror.chunks.get(index)
            if digest is None:
                continue  # not stored: zeros
            key = self._objects.layout.mirror_chunk(self.vm, self.disk, digest)
            if key not in loads:
                loads[key] = functools.partial(self._objects.chunk, self.vm, self.disk, digest)
            piece_start = max(start, index * size)
            piece_end = min(end, (index + 1) * size)
            copies.append(
                _Copy(
                    piece_start - offset, piece_end - piece_start, key, piece_start - index * size
                )
            )
        return (end - 1) // size

    def _read_ahead(self, last_chunk: int) -> None:
        mirror = self._mirror
        assert mirror is not None
        for index in range(last_chunk + 1, last_chunk + 1 + self._readahead):
            digest = mirror.chunks.get(index)
            if digest is not None:
                self._objects.prefetch_chunk(self.vm, self.disk, digest)
