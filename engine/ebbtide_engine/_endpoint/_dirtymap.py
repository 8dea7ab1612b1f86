"""The persistent dirty-region map of one disk: which regions the journal may lack.

Why it exists: when the endpoint dies, writes it acknowledged but had not
yet made durable in the bucket are void (FORMAT.md, "Takeover"). The map
says where they were, so that a restarted endpoint re-reads and re-journals
only those regions of a proxy disk, instead of the whole disk (Zerto's
"bitmap sync"). A region's bit is set and made durable *before* a write is
applied (write-ahead), and cleared only once a durable checkpoint covers
every write made to it.

Stored format, ``<state-dir>/<vpg>/<vm>/<disk>.dirty``, little-endian::

    offset  size  field
         0     8  magic b"EBTDIRTY"
         8     2  format version, 1
        10     2  flags: bit 0 FULL - every region counts as dirty (a full pass,
                  initial sync or mirror pass, has not completed and been made durable)
        12     4  reserved, 0
        16     8  writer epoch of the endpoint that last wrote the map
        24     8  disk size in bytes
        32     8  region size in bytes (a power of two)
        40     8  region count, ceil(disk size / region size)
        48     n  the bitmap, ceil(count / 8) bytes: region i is bit (i % 8) of byte i // 8
      48+n     4  CRC-32C of every byte before it

It is replaced whole (temporary file, fsync, rename, fsync of the directory),
so a crash leaves the old map or the new one, never a mix. A missing,
damaged or mismatched map (another disk size or region size) is never
trusted: the disk is then resynchronised in full.

Cost: only a write that sets a *new* bit waits for the map to be written
(about 7 ms on the test machine's ext4); writes to regions already dirty
cost nothing, and while FULL is durable no write waits at all. Sequential
streams (a mirror pass, ``qemu-img convert``) would set a new bit every
region, so when a new bit follows a dirty region the regions ahead are set
with it: as many as the dirty run just behind it (at least ``mark_ahead``,
at most ``max_mark_ahead``), so the mark-ahead doubles while a stream goes
on; and when the stream comes within ``mark_ahead / 2`` regions of the end
of its marked run, the run is extended in a background map write, so the
stream finds its next regions already durable and does not wait. A 1 GiB
stream then costs about 10 map writes, not 1,024 (or 32, each waited for,
with a fixed mark-ahead of 32): that matters because under heavy writeback
an fsync here can take 0.4 s, and every write of the stream waited for it.
The price is a larger resync after a crash: at most ``max_mark_ahead``
regions that were never written. Regions set ahead and never written are
cleared by the next durable checkpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import pathlib
import struct
from collections.abc import Sequence

import crc32c
import numpy as np

logger = logging.getLogger("ebbtide.endpoint")

MAGIC = b"EBTDIRTY"
VERSION = 1
FLAG_FULL = 0x1
HEADER = struct.Struct("<8sHHIQQQQ")
TRAILER = struct.Struct("<I")
#: ``last_lsn`` of a region whose journal write failed or never finished: never cleared.
POISONED = np.uint64(np.iinfo(np.uint64).max)


@dataclasses.dataclass(frozen=True, slots=True)
class MapImage:
    """What a map file holds (decoded and checked)."""

    flags: int
    epoch: int
    size: int
    region_size: int
    bits: np.ndarray[tuple[int], np.dtype[np.bool_]]

    @property
    def full(self) -> bool:
        return bool(self.flags & FLAG_FULL)


def region_count(size: int, region_size: int) -> int:
    return -(-size // region_size)


def encode(image: MapImage) -> bytes:
    count = len(image.bits)
    header = HEADER.pack(
        MAGIC, VERSION, image.flags, 0, image.epoch, image.size, image.region_size, count
    )
    body = header + np.packbits(image.bits, bitorder="little").tobytes()
    return body + TRAILER.pack(crc32c.crc32c(body))


def decode(data: bytes) -> MapImage:
    """Decode a map file; ValueError says what is wrong with it."""
    if len(data) < HEADER.size + TRAILER.size:
        raise ValueError(f"{len(data)} bytes is too short for a dirty map")
    magic, version, flags, _reserved, epoch, size, region_size, count = HEADER.unpack_from(data)
    if magic != MAGIC:
        raise ValueError("not a dirty map (bad magic)")
    if version != VERSION:
        raise ValueError(f"format version {version}; this engine reads version {VERSION}")
    (crc,) = TRAILER.unpack_from(data, len(data) - TRAILER.size)
    if crc32c.crc32c(data[: -TRAILER.size]) != crc:
        raise ValueError("CRC-32C mismatch (damaged)")
    if (
        region_size <= 0
        or region_size & (region_size - 1)
        or count != region_count(size, region_size)
    ):
        raise ValueError(f"inconsistent geometry: size {size}, region {region_size}, {count}")
    packed = np.frombuffer(data, dtype=np.uint8, offset=HEADER.size)[: -TRAILER.size]
    if len(packed) != -(-count // 8):
        raise ValueError(f"bitmap of {len(packed)} bytes for {count} regions")
    bits = np.unpackbits(packed, count=count, bitorder="little").astype(np.bool_)
    return MapImage(flags, epoch, size, region_size, bits)


def read(path: pathlib.Path) -> MapImage | None:
    """The map at ``path``, or None if there is none; ValueError if it cannot be trusted."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    return decode(data)


@dataclasses.dataclass(frozen=True, slots=True)
class Marked:
    """The regions one write marked (first..last inclusive), handed back when it ends."""

    first: int
    last: int


class DirtyMap:
    """One disk's map, in memory and on disk (see the module docstring).

    In memory, per region: the bit; ``last_lsn``, the highest LSN journaled
    for it (0: none this run); ``inflight``, writes marked but not yet
    journaled; and ``pending``, regions found dirty at start and not yet
    resynchronised. A durable checkpoint ``c`` clears a region when nothing
    is in flight or pending there and ``last_lsn < c`` (recovery to ``c``
    holds every write below ``c``).
    """

    def __init__(
        self,
        path: pathlib.Path,
        *,
        size: int,
        region_size: int,
        epoch: int,
        full: bool,
        bits: np.ndarray[tuple[int], np.dtype[np.bool_]] | None = None,
        mark_ahead: int = 32,
        max_mark_ahead: int = 256,
    ) -> None:
        if region_size <= 0 or region_size & (region_size - 1):
            raise ValueError(f"region size {region_size} is not a power of two")
        self.path = path
        self.size = size
        self.region_size = region_size
        self.count = region_count(size, region_size)
        self.epoch = epoch
        self.full = full
        self.mark_ahead = mark_ahead
        self.max_mark_ahead = max(mark_ahead, max_mark_ahead)
        self.bits = np.zeros(self.count, dtype=np.bool_) if bits is None else bits.copy()
        self.pending = self.bits.copy()
        self.last_lsn = np.zeros(self.count, dtype=np.uint64)
        self.inflight = np.zeros(self.count, dtype=np.int32)
        self._full_ends_after: int | None = None
        self._version = 1  # in-memory changes; persisted ones lag behind
        self._persisted_version = 0
        # What the map file on disk is known to hold (pessimistic while a write runs).
        self._durable_full = False
        self._durable_bits = np.zeros(self.count, dtype=np.bool_)
        self._persist_lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()
        self.persists = 0  # map writes so far (for tests and status)
        self.last_error: str | None = None

    # --- queries ------------------------------------------------------------------

    @property
    def dirty_regions(self) -> int:
        return self.count if self.full else int(np.count_nonzero(self.bits))

    def region_span(self, region: int) -> tuple[int, int]:
        """(offset, length) of a region; the last one may be short."""
        start = region * self.region_size
        return start, min(self.region_size, self.size - start)

    def pending_regions(self) -> Sequence[int]:
        """Regions to resynchronise: all if FULL, else those found dirty at start."""
        if self.full:
            return range(self.count)
        return [int(r) for r in np.flatnonzero(self.pending)]

    # --- the write path -----------------------------------------------------------

    async def mark(self, offset: int, length: int) -> Marked:
        """Set the bits of ``[offset, offset+length)``; returns once they are durable."""
        first = offset // self.region_size
        last = (offset + max(length, 1) - 1) // self.region_size
        span = slice(first, last + 1)
        self.inflight[span] += 1
        marked = Marked(first, last)
        if not self.bits[span].all():
            self.bits[span] = True
            if first > 0 and self.bits[first - 1]:
                # A sequential stream: set the next regions now, in the same map write.
                self.bits[last + 1 : last + 1 + self._ahead(first)] = True
            self._version += 1
        elif first > 0 and not self.full and self.bits[first - 1]:
            self._mark_further(first, last)
        if (self.full and self._durable_full) or self._durable_bits[span].all():
            return marked  # already on disk (the FULL flag covers every region)
        try:
            await self._persist_until(self._version)
        except BaseException:
            self.failed(marked)
            raise
        return marked

    def _mark_further(self, first: int, last: int) -> None:
        """A stream inside its marked run, near the end: extend the run, written in the background.

        So the stream's next regions are durable before it gets there, and it
        does not stop for the map write (an fsync under heavy writeback).
        """
        edge = last + 1 + self.mark_ahead // 2
        if edge >= self.count or self.bits[edge]:
            return
        self.bits[last + 1 : last + 1 + self._ahead(first)] = True
        self._version += 1
        self._persist_soon()

    def _ahead(self, first: int) -> int:
        """How many regions to set ahead: the dirty run ending at ``first - 1``, bounded."""
        behind = self.bits[max(0, first - self.max_mark_ahead) : first][::-1]
        run = len(behind) if behind.all() else int(np.argmin(behind))
        return min(max(run, self.mark_ahead), self.max_mark_ahead)

    def written(self, marked: Marked, lsn: int) -> None:
        """The write was journaled with ``lsn``."""
        if marked.first == marked.last:  # most writes: scalar numpy access is cheaper
            self.inflight[marked.first] -= 1
            if self.last_lsn[marked.first] < lsn:
                self.last_lsn[marked.first] = lsn
            return
        span = slice(marked.first, marked.last + 1)
        self.inflight[span] -= 1
        np.maximum(self.last_lsn[span], np.uint64(lsn), out=self.last_lsn[span])

    def failed(self, marked: Marked) -> None:
        """The write may have reached the disk but not the journal: keep its regions dirty."""
        span = slice(marked.first, marked.last + 1)
        self.inflight[span] -= 1
        self.last_lsn[span] = POISONED

    def resynced(self, first: int, last: int, lsn: int) -> None:
        """Regions ``first..last`` were re-read and journaled with ``lsn``."""
        span = slice(first, last + 1)
        self.pending[span] = False
        np.maximum(self.last_lsn[span], np.uint64(lsn), out=self.last_lsn[span])

    def end_full_after(self, lsn: int) -> None:
        """A full pass ended with ``lsn``: FULL clears once a checkpoint above it is durable."""
        self._full_ends_after = lsn

    def forget_pending(self) -> None:
        """Drop the regions found dirty at start (a mirror pass rewrites them all)."""
        self.pending[:] = False
        self.bits[:] = False
        self._version += 1

    # --- checkpoints --------------------------------------------------------------

    def on_durable(self, checkpoint_id: int) -> bool:
        """Clear what the durable checkpoint covers; True if FULL was cleared now."""
        cut = np.uint64(checkpoint_id)
        clear = self.bits & ~self.pending & (self.inflight == 0) & (self.last_lsn < cut)
        changed = bool(clear.any())
        if changed:
            self.bits[clear] = False
            self.last_lsn[clear] = 0
        full_cleared = False
        if (
            self.full
            and self._full_ends_after is not None
            and self._full_ends_after < checkpoint_id
        ):
            self.full = False
            self._full_ends_after = None
            full_cleared = changed = True
        if changed:
            self._version += 1
            self._persist_soon()
        return full_cleared

    # --- persistence --------------------------------------------------------------

    def image(self) -> MapImage:
        return MapImage(
            FLAG_FULL if self.full else 0, self.epoch, self.size, self.region_size, self.bits.copy()
        )

    async def persist(self) -> None:
        """Write the map as it is now (and wait for any write in progress)."""
        await self._persist_until(self._version)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    async def abandon(self) -> None:
        """Stop writing the map (a simulated crash): background writes are cancelled."""
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    async def _persist_until(self, version: int) -> None:
        async with self._persist_lock:
            if self._persisted_version >= version:
                return  # a map write that started after that change already covered it
            snapshot_version, image = self._version, self.image()
            # While the new image is being written, what it drops is no longer
            # durable: a write marking such a region must wait for the next image.
            self._durable_full = self._durable_full and image.full
            np.logical_and(self._durable_bits, image.bits, out=self._durable_bits)
            await asyncio.to_thread(_replace, self.path, encode(image))
            self.persists += 1
            self._persisted_version = snapshot_version
            self._durable_full = image.full
            self._durable_bits = image.bits

    def _persist_soon(self) -> None:
        task = asyncio.get_running_loop().create_task(self._persist_until(self._version))
        self._background.add(task)
        task.add_done_callback(self._background_done)

    def _background_done(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # Harmless for correctness (clearing is never urgent); the next change retries.
            self.last_error = f"writing {self.path}: {task.exception()}"
            logger.warning("dirty map %s could not be written: %s", self.path, task.exception())


def _replace(path: pathlib.Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically and durably (temp, fsync, rename, fsync dir)."""
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temporary, path)
    directory = os.open(path.parent, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def remove_temporary(path: pathlib.Path) -> None:
    """Delete a temporary map left by a crash during a map write."""
    with contextlib.suppress(FileNotFoundError):
        path.with_name(path.name + ".tmp").unlink()
