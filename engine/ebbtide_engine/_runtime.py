"""A VPG runtime: the writer side of one Virtual Protection Group.

It owns the VPG's journals while it holds the writer lease: every write,
trim and zero-write gets the next VPG-wide LSN and lands in its VM's
buffer; buffers are sealed at each checkpoint (and on size), encoded at
once on a small thread pool, and uploaded by ``upload_concurrency`` workers
in the order they were sealed; a checkpoint is committed to the index only
after every segment sealed before it is durable, and checkpoints commit in
LSN order. Failed uploads are retried with backoff until they land.

Backpressure. Unshipped data held in memory (write data until its segment
is encoded, then the encoded segment) is bounded by ``maxUnshippedBytes``.
Past ``maxUnshippedBytes - 2 x segmentMaxBytes``, encoded segments waiting
for an upload *spill* to ``RuntimeOptions.spill_dir`` (the youngest first:
they are uploaded last) and are read back when their turn comes, so a
burst is acknowledged at local-disk speed while shipping catches up;
``journal.maxSpillBytes`` bounds the spill. Past both bounds (or without a
spill directory, or while spilling fails) ``write()`` waits and the NBD
endpoint delays its replies: a slow or failing bucket slows the writer and
grows the RPO, and never drops a write.

Bursts. While writes arrive faster than ``RuntimeOptions.burst_rate``
(64 MiB/s), uploads hold back: shipping (encoding aside, about
three quarters of the CPU a written byte costs here, plus the S3 server's
when it shares the machine) would otherwise take the cores the guest's
writes need. An upload waits until writes pause for ``_BURST_IDLE``, or
writers wait at the bounds, or the spill is nearly full, or its segment
has waited ``journal.burstShipDelay`` (at most half the target RPO). So a
burst the spill can hold is acknowledged at local-disk speed and shipped
right after it; the RPO grows by at most that delay meanwhile; a steady
stream the bucket keeps up with never spills and never waits.

What it stores locally: only spill files, ``<first>-<last>-e<epoch>-<crc>.arrow``,
each a segment exactly as it will be uploaded (not fsynced). A spilled
write is no more durable than one in memory: it is durable once its
segment is in the bucket and a checkpoint covering it is committed, and
whoever must survive a crash keeps its own record of what is not yet
durable (the endpoint's dirty map). So at open every spill file found is
deleted, never uploaded: it belongs to a writer epoch that has ended.
Everything else is rebuilt from the bucket on open (next LSN, checkpoints,
whether the previous writer stopped cleanly and which of its writes are
void), and a takeover is recorded in the index.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import logging
import os
import pathlib
import random
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from ebbtide_engine import (
    _dilution,
    _errors,
    _format,
    _index,
    _journal,
    _keys,
    _lease,
    _promotion,
    _sla,
    _spec,
)
from ebbtide_engine.storage import _base

logger = logging.getLogger("ebbtide.runtime")

CheckpointKind = _index.CheckpointKind
T = TypeVar("T")

#: A burst begins when writes arrive at RuntimeOptions.burst_rate or faster (measured
#: over windows of _BURST_WINDOW seconds), and ends once none came for _BURST_IDLE.
_BURST_WINDOW = 0.25
_BURST_IDLE = 0.5
#: The shortest wait of an upload held back by a burst before it looks again (seconds).
_BURST_POLL = 0.005


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class RuntimeOptions:
    """How a runtime starts and behaves; the defaults suit production."""

    writer_id: str | None = None
    takeover: _lease.Takeover = "wait"
    lease_seconds: float = 15.0
    auto_checkpoints: bool = True
    compact_every: int = 256
    retry_initial_seconds: float = 0.2
    retry_max_seconds: float = 10.0
    clock: Callable[[], float] = time.time
    #: seconds between background history passes (promotion, dilution); None: only on demand
    maintenance_seconds: float | None = 60.0
    #: recovery disks: bytes per chunk object, and memory for chunks being patched
    mirror_chunk_size: int = 4 << 20
    promotion_memory_bytes: int = 256 << 20
    #: where encoded segments spill when memory is at its bound (None: no spill, writers
    #: wait). This VPG's writer must own it alone: files left in it are deleted at open.
    spill_dir: pathlib.Path | None = None
    #: threads that encode sealed segments (Arrow IPC, checksums)
    encode_threads: int = 2
    #: writes arriving at this rate or faster (bytes per second) are a burst, during
    #: which uploads hold back (journal.burstShipDelay; module docstring, "Bursts")
    burst_rate: int = 64 << 20


@dataclasses.dataclass(frozen=True, slots=True)
class VoidWrites:
    """What a previous writer left that no checkpoint covers (found at start)."""

    previous_epoch: int
    clean_shutdown: bool
    last_checkpoint: int  # the last committed cut; writes above it are void
    void_segments: int  # segments uploaded above that cut (kept, never read)
    void_bytes: int


@dataclasses.dataclass(frozen=True, slots=True)
class RuntimeStatus:
    """A point-in-time view of a runtime, for status displays and the operator."""

    vpg: str
    state: str  # "protecting", "fenced", "closed"
    epoch: int
    writer: str
    next_lsn: int
    last_checkpoint: _index.Checkpoint | None
    rpo_seconds: float | None  # now minus the last durable checkpoint's time
    unshipped_bytes: int
    shipped_bytes: int
    journal_bytes: dict[str, int]  # per VM, segment bytes in the bucket (this and earlier epochs)
    pending_uploads: int
    pending_checkpoints: int
    upload_retries: int
    last_error: str | None
    previous_writer: VoidWrites | None
    sla: _sla.SlaStatus | None = None  # phase, RPO and history against the spec, conditions
    memory_bytes: int = 0  # unshipped data held in memory (what maxUnshippedBytes bounds)
    spilled_bytes: int = 0  # encoded segments in the spill directory, not yet uploaded
    spill_error: str | None = None  # why spilling failed lately (None: working, or off)
    writes_waiting: int = 0  # writes held back right now by the bounds (backpressure)
    uploads_held: int = 0  # sealed segments not yet uploading because of a write burst


@dataclasses.dataclass(frozen=True, slots=True)
class Maintenance:
    """What one history pass did."""

    diluted: int  # automatic checkpoints dropped from the listing
    promoted_lsn: int  # the recovery disks hold every write up to here (0: none yet)
    promotion: _promotion.Promotion | None = None
    promoted_early: bool = False  # a journal at its hard limit moved promotion forward


@dataclasses.dataclass(slots=True, eq=False)
class _Upload:
    """One sealed segment on its way to the bucket: encoded, maybe spilled, uploaded."""

    segment: _journal.SealedSegment
    done: asyncio.Future[None]  # set once it is in the bucket
    ready: asyncio.Future[None]  # set once encoded (key, body and size known)
    memory: int  # bytes it holds in memory (counted in VpgRuntime._memory)
    sealed_at: float = 0.0  # time.monotonic() when sealed
    key: str = ""
    body: bytes | None = None  # None once spilled (until read back for the upload)
    size: int = 0  # encoded bytes
    spill: pathlib.Path | None = None  # its spill file, once written
    spilling: asyncio.Task[None] | None = None  # the spill write in progress
    uploading: bool = False  # an upload worker took it


@dataclasses.dataclass(slots=True)
class _PendingCommit:
    record: _format.IndexRecord
    uploads: list[_Upload]
    future: asyncio.Future[_index.Checkpoint | None]


class VpgRuntime:
    """The writer of one VPG. Create with :meth:`open`; always :meth:`close` (or ``async with``)."""

    def __init__(self) -> None:
        raise TypeError("use `await VpgRuntime.open(spec, store)`")

    @classmethod
    async def open(
        cls,
        spec: _spec.VpgSpec,
        store: _base.ObjectStore,
        *,
        options: RuntimeOptions | None = None,
    ) -> VpgRuntime:
        """Take the VPG's writer lease, rebuild state from the bucket and start protecting.

        Raises ``BucketNotFound`` / ``AccessDenied`` / ``StorageUnavailable``
        if the storage account is not usable, and ``FencedError`` if another
        live writer holds the VPG (see ``RuntimeOptions.takeover``).
        """
        self = object.__new__(cls)
        await self._start(spec, store, options or RuntimeOptions())
        return self

    async def _start(
        self, spec: _spec.VpgSpec, store: _base.ObjectStore, options: RuntimeOptions
    ) -> None:
        self.spec = spec
        self._store = store
        self._options = options
        self._clock = options.clock
        self._layout = _keys.VpgLayout(spec.name)
        self._writer_id = options.writer_id or _lease.default_writer_id()
        await store.check()
        self._lease = await _lease.WriterLease.acquire(
            store,
            self._layout,
            self._writer_id,
            lease_seconds=options.lease_seconds,
            takeover=options.takeover,
            clock=self._clock,
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False
        self._uploads: collections.deque[_Upload] = collections.deque()  # not yet durable
        self._queue: asyncio.Queue[_Upload] = asyncio.Queue()
        self._commits: collections.deque[_PendingCommit] = collections.deque()
        self._commit_wakeup = asyncio.Event()
        self._space = asyncio.Condition()
        self._unshipped = 0  # payload bytes accepted and not yet in the bucket
        self._memory = 0  # bytes of unshipped data held in memory (the bound applies)
        self._spilled = 0  # bytes in spill files
        self._writes_waiting = 0  # writers inside _reserve, held back by the bounds
        self._last_write = 0.0  # time.monotonic() of the latest write (bursts)
        self._window_start = 0.0  # the write-rate window (bursts): when it started
        self._window_bytes = 0  # written in it so far
        self._burst = False  # a burst began and has not paused for _BURST_IDLE yet
        self._burst_bytes = max(1, int(options.burst_rate * _BURST_WINDOW))  # in one window
        self._burst_wakeup = asyncio.Event()  # something that may end a burst hold changed
        self._burst_holding = False  # an upload worker holds back for a burst (one at most)
        self._spilling = 0  # bytes being written to spill files
        self._spill_error: str | None = None
        self._spill_retry_at = 0.0  # monotonic; no spill before (after a failure)
        self._side_tasks: set[asyncio.Task[None]] = set()
        self._in_order = asyncio.Lock()
        self._shipped = 0
        self._retries = 0
        self._last_error: str | None = None
        self._listeners: list[Callable[[_index.Checkpoint], None]] = []
        self._syncing = False
        # VMs whose hard limit promoted early (the history has not grown back since)
        self._cut_short: list[str] = []
        try:
            await self._takeover()
        except BaseException:
            with contextlib.suppress(_errors.EbbtideError):
                await self._lease.release()
            raise
        self._spill_dir = options.spill_dir if spec.journal.max_spill_bytes else None
        if self._spill_dir is not None:
            await asyncio.to_thread(self._clear_spill_dir, self._spill_dir)
        self._encoder = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, options.encode_threads), thread_name_prefix="ebbtide-encode"
        )
        # A buffer seals once it reaches segmentMaxBytes, so it may hold up to one
        # write more: room for an NBD maximum payload (only the pages used cost memory).
        self._arenas = _journal.ArenaPool(spec.journal.segment_max_bytes + (32 << 20))
        self._buffers = {
            vm.name: _journal.JournalBuffer(
                self._layout, vm.name, [d.name for d in vm.disks], self._arenas
            )
            for vm in spec.vms
        }
        self._sizes = {(vm.name, d.name): d.size for vm in spec.vms for d in vm.disks}
        for _ in range(spec.journal.upload_concurrency):
            self._spawn(self._upload_worker())
        self._spawn(self._committer())
        self._spawn(self._renewer())
        if options.auto_checkpoints:
            self._spawn(self._ticker())
        self._maintenance = asyncio.Lock()
        # A previous writer may have promoted and stopped before rewriting the index.
        promoted = self._lease.manifest.promoted_lsn
        self._rewrite_due = any(
            r.record == _format.RECORD_CHECKPOINT and r.lsn < promoted
            for r in self._index.state.records
        )
        self._gc_due = promoted > 0  # finish deletions an interrupted promotion left
        self._cut_short = self._index.state.promoted_early.get(promoted, [])
        if options.maintenance_seconds is not None:
            self._spawn(self._maintainer(options.maintenance_seconds))

    async def _takeover(self) -> None:
        """Load the index, find what the previous writer left, and record our epoch."""
        epoch = self._lease.epoch
        for _attempt in range(10):
            state, _manifest = await _index.load(self._store, self._layout)
            last_cut = state.last_checkpoint.id if state.last_checkpoint else 0
            max_lsn, void_segments, void_bytes = state.max_lsn, 0, 0
            journal_bytes: dict[str, int] = {}
            open_epochs = {r.epoch: r for r in state.epochs if r.end is None}
            ranges = {r.epoch: r for r in state.epochs}
            async for info in self._store.list(self._layout.journals_prefix):
                name = self._layout.parse_segment(info.key)
                max_lsn = max(max_lsn, name.last_lsn)
                known = ranges.get(name.epoch)
                if known is None:
                    continue  # an epoch that never recorded a takeover wrote nothing valid
                if name.epoch in open_epochs and name.last_lsn > last_cut:
                    void_segments += 1
                    void_bytes += info.size
                elif known.end is None or name.first_lsn <= known.end:
                    journal_bytes[name.vm] = journal_bytes.get(name.vm, 0) + info.size
            self._previous = None
            if state.epochs:
                self._previous = VoidWrites(
                    previous_epoch=state.epochs[-1].epoch,
                    clean_shutdown=bool(state.clean_shutdown),
                    last_checkpoint=last_cut,
                    void_segments=void_segments,
                    void_bytes=void_bytes,
                )
            start = max_lsn + 1
            now_ns = int(self._clock() * 1e9)
            records = [
                _format.IndexRecord(
                    record=_format.RECORD_TAKEOVER,
                    seq=0,
                    lsn=start,
                    time_ns=now_ns,
                    epoch=epoch,
                    detail=_json(writer=self._writer_id, valid_through=last_cut),
                    positions=tuple(sorted(state.positions.get(last_cut, {}).items())),
                )
            ]
            layout = self.spec.disk_sizes()
            if state.layout_at(start) != layout:
                records.append(_index.config_record(start, now_ns, epoch, layout))
            self._index = _index.IndexWriter(
                self._store,
                self._layout,
                self._lease,
                state,
                compact_every=self._options.compact_every,
            )
            if await self._open_retrying(functools.partial(self._index.try_append, records)):
                self._next_lsn = start
                self._journal_bytes = journal_bytes
                if self._previous and not self._previous.clean_shutdown:
                    logger.warning(
                        "VPG %s: the previous writer (epoch %d) did not stop cleanly; writes after "
                        "checkpoint %d are not recoverable (%d segments, %d bytes void)",
                        self._layout.vpg,
                        self._previous.previous_epoch,
                        last_cut,
                        void_segments,
                        void_bytes,
                    )
                return
            # The previous writer appended after we loaded: load again.
        raise _errors.FencedError(
            f"VPG {self._layout.vpg!r}: could not record the takeover; the index kept "
            "changing (is another writer still running?)"
        )

    async def _open_retrying(self, attempt: Callable[[], Awaitable[T]], tries: int = 4) -> T:
        """Retry a start-up step on storage errors a few times, then let the error out."""
        delay = self._options.retry_initial_seconds
        for _ in range(tries - 1):
            try:
                return await attempt()
            except _errors.StorageError as exc:
                delay = await self._backoff(exc, delay)
        return await attempt()

    # --- the write path ------------------------------------------------------

    def _check_open(self) -> None:
        if self._lease.lost is not None:
            raise self._lease.lost
        if self._closed:
            raise _errors.RuntimeClosed(f"VPG {self._layout.vpg!r}: the runtime is closed")

    def _check_range(self, vm: str, disk: str, offset: int, length: int) -> None:
        size = self._sizes.get((vm, disk))
        if size is None:
            raise _errors.InvalidRequest(
                f"VPG {self._layout.vpg!r} has no disk {disk!r} in VM {vm!r}"
            )
        if offset < 0 or length <= 0 or offset + length > size:
            raise _errors.InvalidRequest(
                f"{vm}/{disk}: range [{offset}, {offset + length}) is outside the disk "
                f"(size {size}) or empty"
            )

    async def write(self, vm: str, disk: str, offset: int, data: _journal.Data) -> int:
        """Journal a write; returns its LSN. Waits while unshipped data is at its bound.

        ``data`` is copied before this returns (and not before: the caller
        keeps it intact until then, and may reuse it afterwards).
        """
        size = memoryview(data).nbytes
        self._check_open()
        self._check_range(vm, disk, offset, size)
        now = self._last_write = time.monotonic()
        if now - self._window_start >= _BURST_WINDOW:
            self._window_start, self._window_bytes = now, 0
        self._window_bytes += size
        if self._window_bytes >= self._burst_bytes:
            self._burst = True
        await self._reserve(size)
        self._check_open()
        lsn = self._take_lsn()
        buffer = self._buffers[vm]
        buffer.append(lsn, _format.OP_WRITE, disk, offset, size, data)
        if buffer.payload_bytes >= self.spec.journal.segment_max_bytes:
            self._seal(buffer)
            await asyncio.sleep(0)  # let the encoder and the uploads start
        return lsn

    async def trim(self, vm: str, disk: str, offset: int, length: int) -> int:
        """Journal a TRIM (the range reads as zeros after recovery); returns its LSN."""
        return self._append_range(_format.OP_TRIM, vm, disk, offset, length)

    async def write_zeroes(self, vm: str, disk: str, offset: int, length: int) -> int:
        """Journal a WRITE_ZEROES as what it is (no buffer of zeros); returns its LSN."""
        return self._append_range(_format.OP_ZERO, vm, disk, offset, length)

    def _append_range(self, op: int, vm: str, disk: str, offset: int, length: int) -> int:
        self._check_open()
        self._check_range(vm, disk, offset, length)
        lsn = self._take_lsn()
        self._buffers[vm].append(lsn, op, disk, offset, length)
        return lsn

    def _take_lsn(self) -> int:
        lsn = self._next_lsn
        self._next_lsn += 1
        return lsn

    async def _reserve(self, nbytes: int) -> None:
        limit = self.spec.journal.max_unshipped_bytes
        if self._memory + nbytes > limit and self._memory > self._pinned():
            # At the bound: seal what is buffered, so that it can spill or ship.
            for buffer in self._buffers.values():
                self._seal(buffer)
            self._maybe_spill()
            self._writes_waiting += 1
            self._burst_wakeup.set()
            try:
                async with self._space:
                    await self._space.wait_for(
                        lambda: (
                            self._memory + nbytes <= limit
                            or self._memory <= self._pinned()
                            or self._lease.lost is not None
                            or self._closed
                        )
                    )
            finally:
                self._writes_waiting -= 1
        self._memory += nbytes
        self._unshipped += nbytes

    def _pinned(self) -> int:
        """Memory a waiting writer may not count on getting back before the bucket answers.

        Without a spill: none (a write larger than the bound goes through when
        nothing else is held). With one: the uploads in flight, which cannot
        spill; once all else has spilled, one write may go past the bound.
        """
        if not self._spill_on():
            return 0
        return sum(upload.memory for upload in self._uploads if upload.uploading)

    def _spill_on(self) -> bool:
        return self._spill_dir is not None and time.monotonic() >= self._spill_retry_at

    def _seal(self, buffer: _journal.JournalBuffer) -> bool:
        """Seal a buffer that holds changes and start encoding it; True if it did."""
        segment = buffer.seal(vpg=self._layout.vpg, epoch=self._lease.epoch)
        if segment is None:
            return False
        loop = asyncio.get_running_loop()
        upload = _Upload(
            segment,
            loop.create_future(),
            loop.create_future(),
            memory=segment.payload_bytes,
            sealed_at=time.monotonic(),
        )
        self._uploads.append(upload)
        self._queue.put_nowait(upload)  # uploads start in seal order
        encoding = loop.run_in_executor(self._encoder, segment.encode, self._layout)
        encoding.add_done_callback(functools.partial(self._encoded, upload))
        return True

    def _encoded(self, upload: _Upload, encoding: asyncio.Future[tuple[str, bytes]]) -> None:
        if encoding.cancelled():
            return
        exc = encoding.exception()
        if exc is not None:  # a bug: encoding takes validated rows
            logger.error("VPG %s: encoding a segment failed", self._layout.vpg, exc_info=exc)
            self._last_error = f"encoding a segment failed: {exc!r}"
            upload.ready.set_exception(exc)
            return
        upload.key, upload.body = encoding.result()
        upload.size = len(upload.body)
        upload.segment.release(self._arenas)  # the write data: only the encoding is kept
        # Charged at least its payload: without a spill, unshipped data stays within the bound.
        held = max(upload.size, upload.segment.payload_bytes)
        self._memory += held - upload.memory
        upload.memory = held
        upload.ready.set_result(None)
        self._maybe_spill()
        self._wake_writers()

    # --- spilling -----------------------------------------------------------

    def _clear_spill_dir(self, directory: pathlib.Path) -> None:
        """Create the spill directory; delete what an ended writer epoch left (blocking)."""
        try:
            directory.mkdir(parents=True, exist_ok=True)
            stale = [p for p in directory.iterdir() if p.suffix in (".arrow", ".tmp")]
            total = 0
            for path in stale:
                total += path.stat().st_size
                path.unlink()
        except OSError as exc:
            self._spill_failed(f"cannot use the spill directory {directory}: {exc}")
            return
        if stale:
            logger.warning(
                "VPG %s: deleted %d spill files (%d bytes) of an earlier writer: they were never "
                "durable, so they are not uploaded (the endpoint's dirty map resends those writes)",
                self._layout.vpg,
                len(stale),
                total,
            )

    def _spill_failed(self, message: str) -> None:
        self._spill_error = f"{message}; writes wait for the bucket instead (retried in 30 s)"
        self._last_error = self._spill_error
        self._spill_retry_at = time.monotonic() + 30.0
        logger.warning("VPG %s: %s", self._layout.vpg, self._spill_error)

    def _maybe_spill(self) -> None:
        """Spill the youngest encoded segments while memory is near its bound."""
        if not self._spill_on() or not self._tasks:  # (no tasks: closed or aborted)
            return
        journal = self.spec.journal
        threshold = max(
            journal.max_unshipped_bytes - 2 * journal.segment_max_bytes,
            journal.max_unshipped_bytes // 2,
        )
        excess = self._memory - self._spilling - threshold
        for upload in reversed(self._uploads):
            if excess <= 0:
                return
            if upload.body is None or upload.uploading or upload.spilling is not None:
                continue
            if self._spilled + self._spilling + upload.size > journal.max_spill_bytes:
                return  # the spill is full: writers wait for the bucket
            excess -= upload.size
            self._spilling += upload.size
            upload.spilling = asyncio.get_running_loop().create_task(self._spill(upload))
            self._side_tasks.add(upload.spilling)
            upload.spilling.add_done_callback(self._side_tasks.discard)

    async def _spill(self, upload: _Upload) -> None:
        assert self._spill_dir is not None
        assert upload.body is not None
        path = self._spill_dir / upload.key.rpartition("/")[2]
        try:
            await asyncio.to_thread(_write_spill, path, upload.body)
        except OSError as exc:
            await asyncio.to_thread(_unlink_quietly, path)  # no partial file stays
            self._spill_failed(f"spilling to {path} failed: {exc}")
            return
        finally:
            self._spilling -= upload.size
            upload.spilling = None
        upload.spill = path
        self._spilled += upload.size
        self._spill_error = None
        if not upload.uploading:  # else a worker waits to upload it from memory
            upload.body = None
            self._memory -= upload.memory
            upload.memory = 0
            self._wake_writers()

    async def _upload_body(self, upload: _Upload) -> bytes:
        """The encoded segment, from memory or read back from its spill file."""
        upload.uploading = True
        await asyncio.wait([upload.ready])  # (a cancelled worker must not cancel it)
        upload.ready.result()
        if upload.spilling is not None:
            await asyncio.wait([upload.spilling])
        if upload.body is not None:
            return upload.body
        assert upload.spill is not None
        path = upload.spill
        try:
            body = await asyncio.to_thread(path.read_bytes)
        except OSError as exc:
            raise _SpillLost(f"its spill file is unreadable ({exc})") from exc
        name = self._layout.parse_segment(upload.key)
        if name.epoch != self._lease.epoch or _format.object_crc32c(body) != name.crc32c:
            raise _SpillLost(f"its spill file {path} does not hold it (damaged or replaced)")
        held = max(len(body), upload.segment.payload_bytes)
        self._memory += held
        upload.memory = held
        return body

    # --- checkpoints --------------------------------------------------------

    def request_checkpoint(
        self, kind: CheckpointKind = CheckpointKind.AUTOMATIC, tag: str | None = None
    ) -> asyncio.Future[_index.Checkpoint | None]:
        """Cut now; the future resolves once the checkpoint is durable (committed)."""
        self._check_open()
        lsn = self._take_lsn()
        for buffer in self._buffers.values():
            buffer.mark(lsn)
            self._seal(buffer)
        record = _format.IndexRecord(
            record=_format.RECORD_CHECKPOINT,
            seq=0,
            lsn=lsn,
            time_ns=int(self._clock() * 1e9),
            epoch=self._lease.epoch,
            kind=int(kind),
            tag=tag,
            positions=tuple((vm, buffer.position) for vm, buffer in self._buffers.items()),
        )
        future: asyncio.Future[_index.Checkpoint | None] = (
            asyncio.get_running_loop().create_future()
        )
        self._commits.append(_PendingCommit(record, list(self._uploads), future))
        self._commit_wakeup.set()
        return future

    async def checkpoint(
        self, kind: CheckpointKind = CheckpointKind.TAGGED, tag: str | None = None
    ) -> _index.Checkpoint:
        """Take a checkpoint and wait until it is durable; returns it."""
        checkpoint = await self.request_checkpoint(kind, tag)
        assert checkpoint is not None
        return checkpoint

    def add_durable_listener(self, listener: Callable[[_index.Checkpoint], None]) -> None:
        """Call ``listener(checkpoint)`` each time a checkpoint becomes durable, in order.

        Called on the event loop right after the commit; it must not block.
        """
        self._listeners.append(listener)

    def list_checkpoints(self) -> list[_index.Checkpoint]:
        """Every durable checkpoint, oldest first."""
        return list(self._index.state.checkpoints)

    async def _committer(self) -> None:
        while True:
            await self._commit_wakeup.wait()
            self._commit_wakeup.clear()
            while self._commits:
                batch: list[_PendingCommit] = []
                try:
                    await asyncio.gather(*(upload.done for upload in self._commits[0].uploads))
                    batch.append(self._commits.popleft())
                    while self._commits and all(
                        u.done.done() and not u.done.exception() for u in self._commits[0].uploads
                    ):
                        batch.append(self._commits.popleft())
                    await self._append_retrying([item.record for item in batch])
                except _errors.FencedError as exc:
                    for item in [*batch, *self._commits]:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    self._commits.clear()
                    self._wake_writers()
                    return
                for item in batch:
                    result = (
                        self._index.state.checkpoint(item.record.lsn)
                        if item.record.record == _format.RECORD_CHECKPOINT
                        else None
                    )
                    if result is not None:
                        for listener in list(self._listeners):
                            listener(result)
                    if not item.future.done():
                        item.future.set_result(result)

    async def _append_retrying(self, records: list[_format.IndexRecord]) -> None:
        delay = self._options.retry_initial_seconds
        while True:
            try:
                await self._index.append(records)
                return
            except _errors.FencedError:
                raise
            except _errors.StorageError as exc:
                delay = await self._backoff(exc, delay)

    async def _backoff(self, exc: Exception, delay: float) -> float:
        self._retries += 1
        self._last_error = str(exc)
        logger.warning("VPG %s: %s; retrying in %.1f s", self._layout.vpg, exc, delay)
        await asyncio.sleep(delay * random.uniform(0.5, 1.0))
        return min(delay * 2, self._options.retry_max_seconds)

    # --- background tasks ---------------------------------------------------

    def _spawn(self, coroutine: collections.abc.Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            self._last_error = f"{type(exc).__name__}: {exc}"
            logger.error("VPG %s: background task failed: %s", self._layout.vpg, exc)

    async def _upload_worker(self) -> None:
        while True:
            upload = await self._queue.get()
            segment = upload.segment
            try:
                # One at a time, in queue order: uploads start in the order of sealing
                # even when a body has to be read back from its spill file first, or
                # the upload holds back for a burst.
                async with self._in_order:
                    await self._hold_for_burst(upload)
                    body = await self._upload_body(upload)
            except Exception as exc:  # _SpillLost, or a failed encoding (a bug)
                # Acknowledged writes that can no longer reach the bucket: stop, so that
                # nothing after them commits; a restart resends them (dirty map).
                error = _errors.FencedError(
                    f"VPG {self._layout.vpg!r}: segment {upload.key!r} was lost before its "
                    f"upload: {exc}. This writer stops; restart it (the endpoint resends the "
                    "writes its dirty map names)."
                )
                self._lease.fence(error)
                upload.done.set_exception(error)
                self._wake_writers()
                return
            key = upload.key
            delay = self._options.retry_initial_seconds
            while True:
                try:
                    created = await _index.put_new_idempotent(self._store, key, body)
                    break
                except _errors.StorageError as exc:
                    delay = await self._backoff(exc, delay)
            if not created:
                error = _errors.FencedError(
                    f"VPG {self._layout.vpg!r}: segment {key!r} already holds other data; "
                    "another writer with this epoch exists. This writer stops."
                )
                self._lease.fence(error)
                upload.done.set_exception(error)
                self._wake_writers()
                return
            self._shipped += len(body)
            self._journal_bytes[segment.vm] = self._journal_bytes.get(segment.vm, 0) + len(body)
            self._uploads.remove(upload)
            del body
            upload.body = None
            self._memory -= upload.memory
            upload.memory = 0
            if upload.spill is not None:
                self._spilled -= upload.size
                _unlink_quietly(upload.spill)
            upload.done.set_result(None)
            self._unshipped -= segment.payload_bytes
            self._maybe_spill()
            self._wake_writers()

    async def _hold_for_burst(self, upload: _Upload) -> None:
        """Keep ``upload`` back while a burst outruns the bucket (module docstring, "Bursts")."""
        delay = min(self.spec.journal.burst_ship_delay, self.spec.target_rpo / 2)
        if not delay or not self._bursting(upload, delay):
            return
        self._burst_holding = True
        try:
            while self._bursting(upload, delay):
                # Look again when the delay or the idle time could end it, or sooner
                # when something else might (writers waiting, the spill, a close).
                now = time.monotonic()
                timeout = min(upload.sealed_at + delay, self._last_write + _BURST_IDLE) - now
                self._burst_wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._burst_wakeup.wait(), max(timeout, _BURST_POLL))
        finally:
            self._burst_holding = False

    def _bursting(self, upload: _Upload, delay: float) -> bool:
        journal = self.spec.journal
        now = time.monotonic()
        if now - self._last_write >= _BURST_IDLE and not self._writes_waiting:
            self._burst = False
        return (
            self._burst
            and not self._closed
            and self._lease.lost is None
            and self._spill_on()
            and now - upload.sealed_at < delay
            and self._spilled + self._spilling + 4 * journal.segment_max_bytes
            <= journal.max_spill_bytes
        )

    def _wake_writers(self) -> None:
        self._burst_wakeup.set()

        async def notify() -> None:
            async with self._space:
                self._space.notify_all()

        if not self._closed or self._tasks:
            asyncio.get_running_loop().create_task(notify())

    async def _ticker(self) -> None:
        interval = self.spec.checkpoint_interval
        while True:
            await asyncio.sleep(interval)
            if self._lease.lost is None and not self._closed:
                future = self.request_checkpoint(CheckpointKind.AUTOMATIC)
                future.add_done_callback(_consume)

    async def _maintainer(self, period: float) -> None:
        while True:
            await asyncio.sleep(period)
            if self._lease.lost is not None or self._closed:
                return
            try:
                await self.maintain()
            except _errors.FencedError:
                return
            except _errors.EbbtideError as exc:
                self._last_error = f"history maintenance failed (retried): {exc}"
                logger.warning("VPG %s: %s", self._layout.vpg, self._last_error)

    async def maintain(self) -> Maintenance:
        """One history pass now: promote writes older than the history window, then dilute.

        Runs in the background every ``RuntimeOptions.maintenance_seconds``;
        safe to call at any time (passes never overlap) and to interrupt at
        any point: the next pass, in this process or the next writer,
        finishes what was left.
        """
        async with self._maintenance:
            self._check_open()
            now_ns = int(self._clock() * 1e9)
            if self._gc_due:
                promoted = self._lease.manifest.promoted_lsn
                collected = await _promotion.collect_garbage(
                    self._store, self._layout, promoted, lease=self._lease
                )
                self._gc_due = bool(collected.deferred_by)
            sizes = await self._segment_sizes()
            target, early = self._promotion_target(now_ns, sizes)
            if target <= self._lease.manifest.promoted_lsn:
                early = []
            promotion = _promotion.Promotion(promoted_lsn=self._lease.manifest.promoted_lsn)
            if target > promotion.promoted_lsn:
                promotion = await _promotion.promote(
                    self._store,
                    self._layout,
                    self._index,
                    self._lease,
                    target,
                    time_ns=now_ns,
                    early_for=early,
                    chunk_size=self._options.mirror_chunk_size,
                    memory_bytes=self._options.promotion_memory_bytes,
                )
                self._rewrite_due = True
                self._gc_due = promotion.deletion_deferred
                self._cut_short = early
                sizes = await self._segment_sizes()
            self._journal_bytes = {vm: sum(size for _, size in s) for vm, s in sizes.items()}
            state = self._index.state
            drop = _dilution.to_drop_state(state, now_ns=now_ns, spec=self.spec.dilution)
            below = self._lease.manifest.promoted_lsn
            if drop or self._rewrite_due:
                await self._index.rewrite(
                    drop=drop, below=below, reason="maintenance", time_ns=now_ns
                )
                self._rewrite_due = False
            return Maintenance(
                diluted=len(drop),
                promoted_lsn=below,
                promotion=promotion,
                promoted_early=bool(early) and promotion.segments_applied > 0,
            )

    async def _segment_sizes(self) -> dict[str, list[tuple[int, int]]]:
        """Per VM, (last LSN, bytes) of every journal segment in the bucket."""
        sizes: dict[str, list[tuple[int, int]]] = {vm.name: [] for vm in self.spec.vms}
        async for info in self._store.list(self._layout.journals_prefix):
            name = self._layout.parse_segment(info.key)
            sizes.setdefault(name.vm, []).append((name.last_lsn, info.size))
        return sizes

    def _promotion_target(
        self, now_ns: int, sizes: dict[str, list[tuple[int, int]]]
    ) -> tuple[int, list[str]]:
        """The checkpoint to promote to, and the VMs whose hard limit moved it forward.

        The oldest checkpoint inside the history window; and where a VM's
        journal is at its hard limit, the oldest checkpoint above which the
        journal fits under the warning threshold (or 90 % of the limit).
        O(VMs x (segments log segments + log checkpoints x log segments)):
        the journal above a checkpoint only shrinks as the checkpoint gets
        newer, so both searches are bisections.
        """
        ids, times, _kinds = self._index.state.checkpoint_columns()
        if not ids:
            return 0, []
        window_start = now_ns - int(self.spec.journal_history * 1e9)
        if self._index.state.times_sorted:
            first_inside = bisect.bisect_left(times, window_start)
        else:
            first_inside = next((i for i, t in enumerate(times) if t >= window_start), len(ids))
        target_at = min(first_inside, len(ids) - 1)
        early: list[str] = []
        for vm, segments in sorted(sizes.items()):
            if vm not in self._buffers:
                continue
            hard, warning = self.spec.journal_limits(vm)
            ordered = sorted(segments)
            total = sum(size for _, size in ordered)
            if hard is None or total < hard or target_at == len(ids) - 1:
                continue
            goal = warning if warning is not None else hard * 9 // 10
            lasts = [last for last, _ in ordered]
            above = list(itertools.accumulate((size for _, size in reversed(ordered)), initial=0))
            above.reverse()  # above[i]: bytes of the segments from the i-th on

            # The first checkpoint after the target that fits, else the newest one.
            lo, hi = target_at + 1, len(ids) - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if above[bisect.bisect_right(lasts, ids[mid])] <= goal:
                    hi = mid
                else:
                    lo = mid + 1
            target_at = lo
            early.append(vm)
        return ids[target_at], early

    async def _renewer(self) -> None:
        delay = self._options.lease_seconds / 3
        while True:
            await asyncio.sleep(delay)
            try:
                await self._lease.renew(self._clock())
            except _errors.FencedError as exc:
                logger.error("%s", exc)
                self._last_error = str(exc)
                self._wake_writers()
                return
            except _errors.StorageError as exc:
                self._last_error = f"lease renewal failed: {exc}"

    # --- status and lifecycle -----------------------------------------------

    def set_syncing(self, syncing: bool) -> None:
        """Say whether the first full sync runs (the SLA phase is then ``Syncing``)."""
        self._syncing = syncing

    def sla(self) -> _sla.SlaStatus:
        """The VPG's SLA status now, by the runtime's clock."""
        state = self._index.state
        since = state.protected_since_ns
        return _sla.evaluate(
            self.spec,
            state.checkpoints,
            now=self._clock(),
            journal_bytes=self._journal_bytes,
            protected_since=None if since is None else since / 1e9,
            syncing=self._syncing,
            cut_short=bool(self._cut_short),
            cut_short_vms=self._cut_short,
        )

    def status(self) -> RuntimeStatus:
        last = self._index.state.last_checkpoint
        state = "fenced" if self._lease.lost else "closed" if self._closed else "protecting"
        return RuntimeStatus(
            vpg=self._layout.vpg,
            state=state,
            epoch=self._lease.epoch,
            writer=self._writer_id,
            next_lsn=self._next_lsn,
            last_checkpoint=last,
            rpo_seconds=None if last is None else max(0.0, self._clock() - last.time_ns / 1e9),
            unshipped_bytes=self._unshipped,
            memory_bytes=self._memory,
            spilled_bytes=self._spilled,
            spill_error=self._spill_error,
            writes_waiting=self._writes_waiting,
            uploads_held=(
                sum(not upload.uploading for upload in self._uploads) if self._burst_holding else 0
            ),
            shipped_bytes=self._shipped,
            journal_bytes=dict(self._journal_bytes),
            pending_uploads=len(self._uploads),
            pending_checkpoints=len(self._commits),
            upload_retries=self._retries,
            last_error=self._last_error,
            previous_writer=self._previous,
            sla=self.sla(),
        )

    @property
    def store(self) -> _base.ObjectStore:
        return self._store

    async def close(self) -> None:
        """Stop cleanly: ship everything, commit a final checkpoint, release the lease."""
        if self._closed:
            return
        try:
            if self._lease.lost is None:
                final = self.request_checkpoint(CheckpointKind.AUTOMATIC)
                self._closed = True
                self._burst_wakeup.set()  # held uploads go now
                await final
                shutdown = _format.IndexRecord(
                    record=_format.RECORD_SHUTDOWN,
                    seq=0,
                    lsn=self._take_lsn(),
                    time_ns=int(self._clock() * 1e9),
                    epoch=self._lease.epoch,
                )
                await self._append_retrying([shutdown])
                await self._lease.release()
        finally:
            self._closed = True
            await self._cancel_tasks()

    async def abort(self) -> None:
        """Stop at once without shipping or committing anything (a simulated crash).

        The lease stays held until it expires, as after a real crash.
        """
        self._closed = True
        await self._cancel_tasks()

    async def _cancel_tasks(self) -> None:
        for task in [*self._tasks, *self._side_tasks]:
            task.cancel()
        await asyncio.gather(*self._tasks, *self._side_tasks, return_exceptions=True)
        self._tasks.clear()
        self._encoder.shutdown(wait=False, cancel_futures=True)
        for item in self._commits:
            if not item.future.done():
                item.future.set_exception(
                    _errors.RuntimeClosed(f"VPG {self._layout.vpg!r}: closed before commit")
                )
        for upload in self._uploads:
            if not upload.done.done():
                upload.done.cancel()

    async def __aenter__(self) -> VpgRuntime:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()


class _SpillLost(Exception):
    """A spilled segment cannot be read back as it was written."""


def _write_spill(path: pathlib.Path, body: bytes) -> None:
    """Write a spill file (no fsync: see the module docstring)."""
    with path.open("xb") as file:
        file.write(body)


def _unlink_quietly(path: pathlib.Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _json(**fields: object) -> str:
    return json.dumps(fields, sort_keys=True)


def _consume(future: asyncio.Future[_index.Checkpoint | None]) -> None:
    """Retrieve a background checkpoint's outcome (failures are in status)."""
    if not future.cancelled():
        future.exception()
