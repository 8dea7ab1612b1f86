"""One protected disk as an NBD export: the local copy, the journal and the dirty map.

A ``ProtectedDisk`` is the ``ExportBackend`` of one export ``<vpg>/<vm>/<disk>``.
Both modes share one write path; they differ in what the local file is:

- Proxy: the disk itself (``source.path``), which the endpoint serves;
- Mirror target: a sparse replica in the state directory, kept so reads are
  answered with what the hypervisor wrote.

Every write, TRIM and WRITE_ZEROES goes: dirty-map bit set and durable
(write-ahead) -> journal (``VpgRuntime``, which assigns the LSN and copies
the data) -> local file -> NBD reply. The local file and the journal are
updated under one per-disk lock, so they see changes in the same order even
when several connections write to one export (the server does not advertise
multi-conn, but nothing stops two clients). The reply leaves only after the journal
append, so a client that waits for one write's reply before sending
another (to any disk of the VPG) gets LSNs in that order: the write-order
fidelity that makes a VPG-wide checkpoint crash-consistent.

FUA and FLUSH are honoured on the local file (fdatasync). The journal's
durability does not depend on them (QEMU does not forward FLUSH to a mirror
target): the checkpoint interval bounds it, and a checkpoint is requested
when a client that wrote disconnects.

Resynchronisation (proxy mode) re-reads the regions the dirty map names
from the source and journals them as writes, or as WRITE_ZEROES where the
source has a hole or zeros. It runs while the export is served: each step
holds the same lock as client writes from reading the source to journaling
it, so a client write either lands before the step (and is read by it) or
after it (and gets the higher LSN). A mirror target cannot be resynchronised
from here; it waits for the hypervisor's next full pass, whose progress is
the share of the disk written since the pass began (``IntervalSet``).
"""

from __future__ import annotations

import asyncio
import bisect
import enum
import errno
import logging
import os
import pathlib
from collections.abc import Awaitable, Callable, Sequence
from typing import Literal

from ebbtide_engine import _errors, _index, _nbd, _runtime
from ebbtide_engine._endpoint import _dirtymap

logger = logging.getLogger("ebbtide.endpoint")

Mode = Literal["Mirror", "Proxy"]
CheckpointFuture = asyncio.Future[_index.Checkpoint | None]
#: Regions examined per hold of the disk's lock during a resync (holes cost an lseek).
_SCAN_REGIONS = 256


class SyncState(enum.StrEnum):
    """Where a disk stands; the values are what status (and the CRD) show."""

    #: A fresh VPG: the first full copy of the disk is being journaled.
    INITIAL_SYNC = "InitialSync"
    #: Every write reaches the journal; a checkpoint is a consistent copy of the disk.
    PROTECTING = "Protecting"
    #: Regions the journal may lack are being journaled again (proxy), or a new
    #: mirror pass is running (mirror).
    RESYNCING = "Resyncing"
    #: Mirror mode: the journal may lack writes and only the hypervisor can resend
    #: them: start a new blockdev-mirror full pass.
    NEEDS_MIRROR_PASS = "NeedsMirrorPass"


class IntervalSet:
    """Disjoint byte ranges, merged as they are added; ``covered`` is their total length."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.covered = 0

    def add(self, start: int, end: int) -> None:
        first = bisect.bisect_left(self._ends, start)  # ranges that end at or after start
        stop = bisect.bisect_right(self._starts, end)  # ranges that start at or before end
        if first < stop:
            starts, ends = self._starts[first:stop], self._ends[first:stop]
            removed = sum(ends) - sum(starts)
            start = min(start, self._starts[first])
            end = max(end, self._ends[stop - 1])
        else:
            removed = 0
        self._starts[first:stop] = [start]
        self._ends[first:stop] = [end]
        self.covered += end - start - removed

    def __len__(self) -> int:
        return len(self._starts)


class ProtectedDisk:
    """The ExportBackend of one protected disk (see the module docstring)."""

    def __init__(
        self,
        *,
        runtime: _runtime.VpgRuntime,
        vm: str,
        disk: str,
        mode: Mode,
        local: _nbd.FileBackend,
        dirty: _dirtymap.DirtyMap,
        request_checkpoint: Callable[[], CheckpointFuture | None],
    ) -> None:
        self.vm = vm
        self.disk = disk
        self.mode = mode
        self.export = f"{runtime.spec.name}/{vm}/{disk}"
        self.local = local
        self.dirty = dirty
        self._runtime = runtime
        self._request_checkpoint = request_checkpoint
        self._order = asyncio.Lock()
        self.state = SyncState.PROTECTING
        self.message = ""
        self.done_bytes = 0
        self.total_bytes = 0
        self.coverage: IntervalSet | None = None  # mirror mode, while a pass is awaited
        self._pass_end_lsn: int | None = None  # Protecting once a checkpoint above it is durable
        self.last_lsn = 0  # the last LSN journaled for this disk
        self._durable_id = 0  # the newest durable checkpoint seen
        self.writes = 0
        self.bytes_written = 0
        self.trims = 0
        self.zeroes = 0
        self.failures = 0

    # --- ExportBackend --------------------------------------------------------------

    @property
    def size(self) -> int:
        return self.local.size

    @property
    def read_only(self) -> bool:
        return False

    async def read(self, offset: int, length: int) -> bytes:
        return await self.local.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, *, fua: bool) -> None:
        # ``data`` may be the NBD receive buffer: the file's pwrite and the journal's
        # arena copy it before this returns, and nothing keeps a reference.
        await self._journaled(
            offset,
            len(data),
            lambda: self.local.write(offset, data, fua=fua),
            lambda: self._runtime.write(self.vm, self.disk, offset, data),
        )
        self.writes += 1
        self.bytes_written += len(data)

    async def flush(self) -> None:
        await self.local.flush()

    async def trim(self, offset: int, length: int, *, fua: bool) -> None:
        await self._journaled(
            offset,
            length,
            lambda: self.local.trim(offset, length, fua=fua),
            lambda: self._runtime.trim(self.vm, self.disk, offset, length),
        )
        self.trims += 1

    async def write_zeroes(self, offset: int, length: int, *, fua: bool, may_trim: bool) -> None:
        await self._journaled(
            offset,
            length,
            lambda: self.local.write_zeroes(offset, length, fua=fua, may_trim=may_trim),
            lambda: self._runtime.write_zeroes(self.vm, self.disk, offset, length),
        )
        self.zeroes += 1

    async def disconnected(self) -> None:
        # A client that wrote and left (nbdcopy, qemu-img, a mirror job that ended)
        # should find its writes durable soon, whatever the checkpoint interval.
        if self.last_lsn > self._durable_id:
            self._request_checkpoint()

    async def _journaled(
        self,
        offset: int,
        length: int,
        apply: Callable[[], Awaitable[None]],
        journal: Callable[[], Awaitable[int]],
    ) -> None:
        marked = await self.dirty.mark(offset, length)
        try:
            async with self._order:
                # The journal append (the LSN, the arena copy), then the local
                # change; both finish before the next change to this disk starts,
                # and before the reply. One after the other, not side by side: the
                # local write of a plain write is a page-cache copy on the loop
                # itself (FileBackend), and a task to run it beside the append
                # cost two more turns of the loop per write.
                lsn = await journal()
                await apply()
        except BaseException as exc:
            # One of the two may hold the change while the other does not: the
            # region stays dirty, and a resync journals the source's bytes again.
            self.dirty.failed(marked)
            self.failures += 1
            if isinstance(exc, _errors.EbbtideError) and not isinstance(exc, _nbd.NbdError):
                raise _nbd_error(exc) from exc
            raise
        self.dirty.written(marked, lsn)
        self._journaled_up_to(offset, length, lsn)

    def _journaled_up_to(self, offset: int, length: int, lsn: int) -> None:
        self.last_lsn = lsn
        coverage = self.coverage
        if coverage is None:
            return
        coverage.add(offset, offset + length)
        self.done_bytes = coverage.covered
        if self.state == SyncState.NEEDS_MIRROR_PASS:
            self.state = SyncState.RESYNCING
            self.message = "a mirror pass is running"
        if coverage.covered >= self.size:
            self.coverage = None
            self.message = "the mirror pass is complete; waiting for the checkpoint that covers it"
            self._end_pass(lsn)

    # --- sync state -------------------------------------------------------------------

    def start_mirror_pass(self, state: SyncState, message: str) -> None:
        """Wait for a full mirror pass: the journal is consistent once it has covered the disk."""
        self.state = state
        self.message = message
        self.coverage = IntervalSet()
        self._pass_end_lsn = None
        self.done_bytes = 0
        self.total_bytes = self.size
        # The pass rewrites every region: what the map held is moot, and FULL says
        # (durably, once the map is written) that a pass is still owed.
        self.dirty.full = True
        self.dirty.forget_pending()

    def _end_pass(self, lsn: int) -> CheckpointFuture | None:
        self._pass_end_lsn = lsn
        if self.dirty.full:
            self.dirty.end_full_after(lsn)
        return self._request_checkpoint()

    def on_durable(self, checkpoint_id: int) -> None:
        """A checkpoint became durable: clear the map, and end a sync it completes."""
        self._durable_id = checkpoint_id
        self.dirty.on_durable(checkpoint_id)
        if self._pass_end_lsn is not None and self._pass_end_lsn < checkpoint_id:
            self._pass_end_lsn = None
            if self.coverage is None and self.state != SyncState.PROTECTING:
                logger.info("%s: %s done (checkpoint %d)", self.export, self.state, checkpoint_id)
                self.state = SyncState.PROTECTING
                self.message = ""
                self.done_bytes = self.total_bytes = self.size

    def prepare_resync(self, state: SyncState, message: str) -> None:
        """Proxy mode: the regions the map names are to be journaled again (see resync)."""
        self.state = state
        self.message = message
        regions = self.dirty.pending_regions()
        self.total_bytes = sum(self.dirty.region_span(r)[1] for r in regions)
        self.done_bytes = 0

    async def resync(self, source: pathlib.Path) -> None:
        """Journal again every region the dirty map names (proxy mode), then checkpoint."""
        try:
            await self._resync(source)
        except Exception as exc:
            self.message = f"resync failed ({exc}); restart the endpoint to try again"
            raise

    async def _resync(self, source: pathlib.Path) -> None:
        regions = self.dirty.pending_regions()
        last_lsn: int | None = None
        fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            i = 0
            while i < len(regions):
                async with self._order:
                    batch = _consecutive(regions, i, _SCAN_REGIONS)
                    spans = [self.dirty.region_span(r) for r in batch]
                    zeros, data = await asyncio.to_thread(_scan, fd, spans)
                    if zeros:
                        start = spans[0][0]
                        end = spans[zeros - 1][0] + spans[zeros - 1][1]
                        lsn = await self._runtime.write_zeroes(
                            self.vm, self.disk, start, end - start
                        )
                        self.dirty.resynced(batch[0], batch[zeros - 1], lsn)
                        self.done_bytes += end - start
                        last_lsn = lsn
                    if data is not None:
                        region = batch[zeros]
                        offset = spans[zeros][0]
                        lsn = await self._runtime.write(self.vm, self.disk, offset, data)
                        self.dirty.resynced(region, region, lsn)
                        self.done_bytes += len(data)
                        last_lsn = lsn
                        zeros += 1
                    i += zeros
        finally:
            os.close(fd)
        if last_lsn is None:
            self._pass_end_lsn = None
            self.state = SyncState.PROTECTING
            self.message = ""
            self.done_bytes = self.total_bytes = self.size
            return
        self.last_lsn = max(self.last_lsn, last_lsn)
        self.message = "resync journaled; waiting for the checkpoint that covers it"
        checkpoint = self._end_pass(last_lsn)
        if checkpoint is not None:
            await checkpoint  # on_durable() has run by then: the disk is Protecting
        await self.dirty.persist()  # and the map on disk says so


def _consecutive(regions: Sequence[int], start: int, limit: int) -> list[int]:
    """``regions[start:]`` up to ``limit`` long, cut where the numbers stop being consecutive."""
    batch = [regions[start]]
    for region in regions[start + 1 : start + limit]:
        if region != batch[-1] + 1:
            break
        batch.append(region)
    return batch


def _scan(fd: int, spans: list[tuple[int, int]]) -> tuple[int, bytes | None]:
    """How many leading spans read as zeros, and the data of the first one that does not."""
    for index, (offset, length) in enumerate(spans):
        data = _read_unless_zero(fd, offset, length)
        if data is not None:
            return index, data
    return len(spans), None


_ZEROS = bytes(4 << 20)


def _read_unless_zero(fd: int, offset: int, length: int) -> bytes | None:
    """The bytes of a range, or None if it is a hole or all zeros."""
    try:
        data_at = os.lseek(fd, offset, os.SEEK_DATA)
    except OSError as exc:
        if exc.errno == errno.ENXIO:
            return None  # no data from here to the end of the file
        data_at = offset  # SEEK_DATA unsupported (a block device): read
    if data_at >= offset + length:
        return None
    parts = []
    done = 0
    while done < length:
        piece = os.pread(fd, length - done, offset + done)
        if not piece:
            break  # past the end of a shorter file: zeros
        parts.append(piece)
        done += len(piece)
    data = b"".join(parts)
    if len(data) < length:
        data += bytes(length - len(data))
    zero = _ZEROS[:length] if length <= len(_ZEROS) else bytes(length)
    return None if data == zero else data


def _nbd_error(exc: _errors.EbbtideError) -> _nbd.NbdError:
    """What an NBD client is told when the journal refused a change."""
    if isinstance(exc, _errors.FencedError | _errors.RuntimeClosed):
        return _nbd.NbdError(_nbd.Errno.ESHUTDOWN, f"the journal stopped: {exc}")
    if isinstance(exc, _errors.InvalidRequest):
        return _nbd.NbdError(_nbd.Errno.EINVAL, str(exc))
    return _nbd.NbdError(_nbd.Errno.EIO, f"journal: {exc}")
