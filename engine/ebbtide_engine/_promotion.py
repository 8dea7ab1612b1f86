"""Promotion: apply journal writes older than the history to the recovery disks, then drop them.

Promotion to checkpoint ``P`` (the oldest one still inside the history
window, or a later one when a journal is at its hard limit), as the lease
holder, in this order, each step safe to interrupt (kill -9) and resumed by
the next pass of this or the next writer:

1. Replay the valid journal rows with ``promoted < LSN <= P`` onto the
   recovery disks at ``promoted``: the touched chunks are loaded (or zero),
   patched, and stored create-only under their SHA-256 (idempotent; all-zero
   chunks are not stored); then a new chunk map per disk at ``P`` is
   created. Memory is bounded: dirty chunks beyond ``memory_bytes`` are
   stored early and re-read if touched again. Segments are verified (CRC,
   chain, end positions) exactly as recovery does: a missing segment stops
   promotion, never produces a silently wrong disk.
2. Append a promotion record ``P`` with the journal positions at ``P`` to
   the index (recovery starts the segment chains there).
3. Compare-and-swap the manifest's ``promoted_lsn`` to ``P``. This is the
   commit: before it, readers use the old maps and the old journal; after it,
   the new maps and the journal above ``P``. A fenced writer fails here.
4. Delete what is dead: journal segments entirely at or below ``P``
   (segments never span a checkpoint), maps below ``P``, and chunks no map
   at or above ``P`` references. Every deletion is implied by the manifest,
   so any later pass can redo it: deletion is deferred while a reader holds
   the VPG (``_holds``), and stops as soon as this writer is fenced.

Checkpoints below ``P`` stop being listed at once (readers prune by the
manifest); the index rewrite that drops their records follows in the same
maintenance pass.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Callable, Iterable
from typing import TypeVar, cast

import numpy as np

from ebbtide_engine import _errors, _format, _holds, _index, _keys, _lease, _mirror
from ebbtide_engine.storage import _base

logger = logging.getLogger("ebbtide.promotion")

_T = TypeVar("_T")
_PUT_ATTEMPTS = 5  # per chunk; a pass that still fails is simply run again later
_HASHERS = 2  # promotion's worker threads hashing chunks
_WRITE_BEHIND_MIN = 8 << 20  # bytes of writes that leave a chunk alone before it is stored


@dataclasses.dataclass(frozen=True, slots=True)
class Promotion:
    """What one promotion did."""

    promoted_lsn: int  # now in the manifest (unchanged if nothing was promoted)
    segments_applied: int = 0
    bytes_applied: int = 0  # journal bytes read and applied
    chunks_stored: int = 0
    objects_deleted: int = 0
    #: deletion was deferred by live holds (readers); a later pass redoes it
    deletion_deferred: bool = False
    #: seconds from the start to the commit (recovery disks stored, manifest switched)
    commit_seconds: float = 0.0
    #: seconds of the garbage collection after the commit
    collect_seconds: float = 0.0


class _Disk:
    """One recovery disk being patched: a bounded cache of dirty chunks.

    A chunk is in at most one of: ``dirty`` (being patched, in memory),
    ``pending`` (handed to a store task: being hashed and put; still readable
    here) or only ``chunks`` (stored, or all zeros when absent).
    """

    def __init__(self, promoter: _Promoter, vm: str, disk: str, size: int, base: dict[int, bytes]):
        self.promoter = promoter
        self.vm, self.disk, self.size = vm, disk, size
        self.chunks = dict(base)  # chunk index -> sha256 (absent: zeros)
        self.dirty: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self.pending: dict[int, tuple[int, bytearray]] = {}  # index -> (generation, bytes)
        self.generations: dict[int, int] = {}  # index -> the latest store's generation
        # Write-behind candidates, least recently patched first: index -> bytes
        # applied (all disks) when last patched. A chunk leaves for good once
        # stored early: write-behind stores a chunk at most once.
        self.candidates: collections.OrderedDict[int, int] = collections.OrderedDict()
        self.stored_early: set[int] = set()

    async def chunk(self, index: int) -> bytearray:
        buffer = self.dirty.get(index)
        if buffer is not None:
            self.dirty.move_to_end(index)
            return buffer
        size = self.promoter.chunk_size
        length = min(size, self.size - index * size)
        pending = self.pending.get(index)
        if pending is not None:  # being stored: patch a copy (the store task keeps its own)
            buffer = self.promoter.buffer(length, pending[1])
        elif (digest := self.chunks.get(index)) is None:
            buffer = self.promoter.buffer(length)
        else:
            data = await _mirror.read_chunk(
                self.promoter.store, self.promoter.layout, self.vm, self.disk, digest
            )
            buffer = self.promoter.buffer(length, data)
        self.dirty[index] = buffer
        await self.promoter.make_room(self, index)
        return buffer

    async def apply(self, op: int, offset: int, length: int, data: memoryview | None) -> None:
        size = self.promoter.chunk_size
        end = min(offset + length, self.size)
        self.promoter.applied += length
        while offset < end:
            index, start = divmod(offset, size)
            count = min(size - start, end - offset)
            buffer = await self.chunk(index)
            if index not in self.stored_early:
                self.candidates[index] = self.promoter.applied
                self.candidates.move_to_end(index)
            if op == _format.OP_WRITE:
                assert data is not None
                buffer[start : start + count] = data[:count]
                data = data[count:]
            else:
                buffer[start : start + count] = bytes(count)
            offset += count

    def evict(self, index: int) -> bytearray:
        return self.dirty.pop(index)


class _Promoter:
    """Stores patched chunks in background tasks while journal segments are still applied.

    Hashing (SHA-256, which releases the GIL) and the zero check run in
    worker threads inside the store tasks, so the event loop keeps fetching,
    decoding and applying segments; ``concurrency`` puts are in flight, as
    many as a plain upload would run (hashing does not hold a put slot).
    Write-behind: a dirty chunk that the last two chunks' worth of journal
    writes (at least ``_WRITE_BEHIND_MIN``) did not touch is stored at once
    (once per chunk; touched again, it waits for the memory bound or the
    end), so puts start with the first segment and overlap the gets of later
    ones instead of following them.
    """

    def __init__(
        self,
        store: _base.ObjectStore,
        layout: _keys.VpgLayout,
        *,
        chunk_size: int,
        memory_bytes: int,
        concurrency: int,
    ) -> None:
        self.store, self.layout = store, layout
        self.chunk_size = chunk_size
        self.memory_bytes = memory_bytes
        self.disks: list[_Disk] = []
        self.puts: set[asyncio.Task[None]] = set()
        self.slots = asyncio.Semaphore(concurrency)  # puts in flight
        self.staged = asyncio.Semaphore(concurrency + _HASHERS)  # chunks handed to store tasks
        self.stored = 0
        self.applied = 0  # bytes of journal writes applied (all disks)
        self.next_write_behind = 0
        self.free: list[bytearray] = []  # stored chunks' buffers, to be reused
        self.free_limit = concurrency + _HASHERS + 2

    def buffer(self, length: int, content: bytes | bytearray | None = None) -> bytearray:
        """A chunk buffer of ``length`` bytes: ``content``, zero-padded (or all zeros).

        Buffers of stored chunks are reused: a fresh 4 MiB allocation is
        memory the kernel maps and zeroes page by page on first touch, on the
        event loop, which costs about ten times the copy into a reused buffer
        (measured: 5 ms vs 0.5 ms per chunk; bench/checkpoints.py).
        """
        if length != self.chunk_size or not self.free:
            buffer = bytearray(length)
            if content is not None:
                buffer[: len(content)] = content[:length]
            return buffer
        buffer = self.free.pop()
        filled = 0
        if content is not None:
            filled = min(len(content), length)
            buffer[:filled] = content[:filled]
        if filled < length:
            buffer[filled:] = _zeros(length - filled)
        return buffer

    def recycle(self, buffer: bytearray) -> None:
        if len(buffer) == self.chunk_size and len(self.free) < self.free_limit:
            self.free.append(buffer)

    def dirty_bytes(self) -> int:
        return sum(len(d.dirty) for d in self.disks) * self.chunk_size

    async def make_room(self, current: _Disk, keep: int) -> None:
        """Store dirty chunks early while over the memory bound (never the one in use)."""
        while self.dirty_bytes() > self.memory_bytes:
            victims = [
                (disk, index)
                for disk in sorted(self.disks, key=lambda d: -len(d.dirty))
                for index in list(disk.dirty)[:2]
                if not (disk is current and index == keep)
            ]
            if not victims:
                return
            disk, index = victims[0]
            await self.store_chunk(disk, index, disk.evict(index))

    async def write_behind(self, *, force: bool = False) -> None:
        """Store the chunks the last writes left alone (see the class docstring).

        Called after each row (cheap: it looks only every quarter chunk, at
        least 1 MiB, of writes, unless ``force``) and after each segment; each
        candidate is looked at once, when stored.
        """
        if self.applied < self.next_write_behind and not force:
            return
        self.next_write_behind = self.applied + max(self.chunk_size // 4, _WRITE_BEHIND_MIN // 8)
        settled = self.applied - max(2 * self.chunk_size, _WRITE_BEHIND_MIN)
        for disk in self.disks:
            while disk.candidates:
                index, patched_at = next(iter(disk.candidates.items()))
                if patched_at > settled:
                    break
                del disk.candidates[index]
                disk.stored_early.add(index)
                if index in disk.dirty:  # else already stored for the memory bound
                    await self.store_chunk(disk, index, disk.evict(index))

    async def store_chunk(self, disk: _Disk, index: int, buffer: bytearray) -> None:
        """Hand the chunk's new content to a background store task (bounded)."""
        generation = disk.generations.get(index, 0) + 1
        disk.generations[index] = generation
        disk.pending[index] = (generation, buffer)
        await self.staged.acquire()
        put = asyncio.ensure_future(self._store(disk, index, generation, buffer))
        self.puts.add(put)
        put.add_done_callback(self.puts.discard)

    async def _store(self, disk: _Disk, index: int, generation: int, buffer: bytearray) -> None:
        # ``buffer`` is not changed from here on (a chunk patched again while
        # pending is patched in a copy), so it is hashed and put as it is, and
        # reused once stored: no store keeps ``data`` after put_new returns.
        try:
            digest = await _in_worker("hash", _digest, buffer)
            if digest is not None:
                async with self.slots:
                    await self._put(disk, digest, buffer)
            if disk.generations.get(index) == generation:  # no newer content stored since
                if digest is None:
                    disk.chunks.pop(index, None)  # all zeros: not stored
                else:
                    disk.chunks[index] = digest
            if disk.pending.get(index, (0,))[0] == generation:
                del disk.pending[index]
            self.recycle(buffer)
        finally:
            self.staged.release()

    async def _put(self, disk: _Disk, digest: bytes, data: bytearray) -> None:
        key = self.layout.mirror_chunk(disk.vm, disk.disk, digest)
        # Every backend takes any bytes-like object and keeps none after the call
        # (memory copies it, local writes it, S3 sends it): a bytes copy of each
        # 4 MiB chunk would cost a fresh allocation, ~5 ms of page faults here.
        body = cast(bytes, data)
        for attempt in range(_PUT_ATTEMPTS):
            try:
                await self.store.put_new(key, body)
                self.stored += 1
                return
            except _errors.ObjectExists:
                return  # content-addressed: the same bytes are there already
            except _errors.StorageError:
                if attempt == _PUT_ATTEMPTS - 1:
                    raise
                await asyncio.sleep(0.05 * 2**attempt)

    async def flush(self) -> None:
        for disk in self.disks:
            while disk.dirty:
                index = next(iter(disk.dirty))
                await self.store_chunk(disk, index, disk.evict(index))
        await self.drain()

    async def drain(self) -> None:
        while self.puts:
            done = list(self.puts)
            results = await asyncio.gather(*done, return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    raise result


_workers: dict[str, concurrent.futures.ThreadPoolExecutor] = {}


def _in_worker(pool: str, function: Callable[..., _T], *args: object) -> asyncio.Future[_T]:
    """Run CPU work (hashing, decoding; both release the GIL) on promotion's own threads.

    Not on the default executor: the storage backends' blocking I/O (a local
    account's writes and fsyncs) fills that one, and hashing queued behind it
    would stall the pipeline. Decoding has its own thread (``pool="decode"``),
    so the next segment is never queued behind the hashing of chunks
    (``pool="hash"``, ``_HASHERS`` threads).
    """
    if pool not in _workers:
        _workers[pool] = concurrent.futures.ThreadPoolExecutor(
            max_workers=_HASHERS if pool == "hash" else 1,
            thread_name_prefix=f"ebbtide-promotion-{pool}",
        )
    return asyncio.get_running_loop().run_in_executor(_workers[pool], function, *args)


def _digest(buffer: bytearray) -> bytes | None:
    """The SHA-256 of a chunk, or None if it is all zeros (in a worker thread)."""
    if buffer == _zeros(len(buffer)):  # memcmp: stops at the first non-zero byte
        return None
    return hashlib.sha256(buffer).digest()


@functools.cache
def _zeros(length: int) -> bytes:
    return bytes(length)  # calloc: its pages stay the kernel's shared zero page


async def promote(
    store: _base.ObjectStore,
    layout: _keys.VpgLayout,
    index: _index.IndexWriter,
    lease: _lease.WriterLease,
    target: int,
    *,
    time_ns: int,
    early_for: Iterable[str] = (),
    chunk_size: int = _mirror.DEFAULT_CHUNK_SIZE,
    memory_bytes: int = 256 << 20,
    concurrency: int = 8,
    prefetch: int = 4,
) -> Promotion:
    """Promote every write up to checkpoint ``target`` (see the module docstring).

    ``early_for``: the VMs whose journal hard limit moved ``target`` forward;
    recorded in the promotion record (the history SLA stays unmet after a restart).
    """
    old = lease.manifest.promoted_lsn
    if target <= old:
        return Promotion(promoted_lsn=old)
    state = index.state
    if state.checkpoint(target) is None:
        raise _errors.CheckpointNotFound(f"cannot promote to {target}: not a listed checkpoint")
    positions = state.positions[target]
    ranges = state.recovery_ranges(target, old)
    disks_now = state.layout_at(target)
    disks_before = state.layout_at(old) if old else {}
    await lease.wait_for_foreign_deletions()  # a forced-out writer may still be deleting
    started = time.perf_counter()
    promoter = _Promoter(
        store, layout, chunk_size=chunk_size, memory_bytes=memory_bytes, concurrency=concurrency
    )
    segments = applied = 0
    try:
        for vm in sorted(disks_now):
            disks: dict[str, _Disk] = {}
            for disk, size in disks_now[vm].items():
                base: dict[int, bytes] = {}
                if disk in disks_before.get(vm, {}):
                    mirror = await _mirror.required_map(store, layout, vm, disk, old)
                    promoter.chunk_size = mirror.chunk_size
                    base = {i: d for i, d in mirror.chunks.items() if i * mirror.chunk_size < size}
                disks[disk] = _Disk(promoter, vm, disk, size, base)
                promoter.disks.append(disks[disk])
            plan = await _mirror.plan_vm(store, layout, vm, ranges)
            chain = _mirror.ChainCheck()
            fetches: dict[int, asyncio.Task[_format.JournalSegment]] = {}
            reading = asyncio.Semaphore(2)  # gets compete with the chunk puts for threads
            try:
                for i, item in enumerate(plan):
                    for ahead in range(i, min(i + prefetch, len(plan))):
                        if ahead not in fetches:  # fetched and decoded while others are applied
                            fetches[ahead] = asyncio.ensure_future(
                                _fetch(store, plan[ahead], reading)
                            )
                    segment = await fetches.pop(i)
                    chain.link(item, segment)
                    await _apply(segment, item.range, disks)
                    await promoter.write_behind(force=True)
                    segments += 1
                    applied += item.size
            finally:
                for task in fetches.values():
                    task.cancel()
            chain.check_ends([vm], ranges)
        await promoter.flush()
        for disk_state in promoter.disks:
            mirror = _format.MirrorMap(
                vpg=layout.vpg,
                vm=disk_state.vm,
                disk=disk_state.disk,
                lsn=target,
                disk_size=disk_state.size,
                chunk_size=promoter.chunk_size,
                chunks=disk_state.chunks,
            )
            key = layout.mirror_map(disk_state.vm, disk_state.disk, target)
            if not await _index.put_new_idempotent(store, key, _format.encode_mirror_map(mirror)):
                raise _errors.CorruptObjectError(
                    key, "holds a different recovery disk for the same LSN; promotion stops"
                )
    finally:
        for put in promoter.puts:
            put.cancel()
        await asyncio.gather(*promoter.puts, return_exceptions=True)
    early = sorted(set(early_for))
    record = _format.IndexRecord(
        record=_format.RECORD_PROMOTION,
        seq=0,
        lsn=target,
        time_ns=time_ns,
        epoch=lease.epoch,
        positions=tuple(sorted(positions.items())),
        detail=json.dumps({"early_for": early}) if early else None,
    )
    await index.append_retrying([record])
    await lease.update(lambda m: dataclasses.replace(m, promoted_lsn=target))
    index.state.prune_below(target)
    committed = time.perf_counter()
    collected = await collect_garbage(store, layout, target, disks_now, lease=lease)
    return Promotion(
        promoted_lsn=target,
        segments_applied=segments,
        bytes_applied=applied,
        chunks_stored=promoter.stored,
        objects_deleted=collected.deleted,
        deletion_deferred=bool(collected.deferred_by),
        commit_seconds=committed - started,
        collect_seconds=time.perf_counter() - committed,
    )


async def _fetch(
    store: _base.ObjectStore, item: _mirror.PlannedSegment, reading: asyncio.Semaphore
) -> _format.JournalSegment:
    async with reading:  # in plan order: the next segment needed is read first
        body = (await store.get(item.key)).data
    return await _in_worker("decode", _mirror.decode_segment, item, body)


async def _apply(
    segment: _format.JournalSegment, r: _index.EpochRange, disks: dict[str, _Disk]
) -> None:
    rows = segment.rows
    assert r.end is not None
    selected = np.nonzero((rows.lsn >= r.start) & (rows.lsn <= r.end))[0]
    targets = [disks.get(name) for name in segment.disks]
    for i in selected.tolist():
        op = int(rows.op[i])
        if op == _format.OP_CHECKPOINT:
            continue
        disk = targets[int(rows.disk[i])]
        if disk is None:
            continue  # a disk that no longer exists at the promoted checkpoint
        data = None
        if op == _format.OP_WRITE:
            data = rows.data[int(rows.data_offsets[i]) : int(rows.data_offsets[i + 1])]
        await disk.apply(op, int(rows.offset[i]), int(rows.length[i]), data)
        await disk.promoter.write_behind()


@dataclasses.dataclass(frozen=True, slots=True)
class Collected:
    """What one garbage collection did."""

    deleted: int = 0
    #: live holds that made it defer every deletion (a later pass redoes it)
    deferred_by: tuple[_holds.Hold, ...] = ()


async def collect_garbage(
    store: _base.ObjectStore,
    layout: _keys.VpgLayout,
    promoted_lsn: int,
    disks: dict[str, dict[str, int]] | None = None,
    *,
    lease: _lease.WriterLease | None = None,
    monotonic: Callable[[], float] = time.monotonic,
    concurrency: int = 8,
) -> Collected:
    """Delete what ``promoted_lsn`` made dead; idempotent.

    Journal segments entirely at or below it, chunk maps below it, and chunks
    that no map at or above it references (maps above it are left by an
    interrupted promotion; they are deleted once promotion passes them).

    Call it only after the manifest says ``promoted_lsn``. It first lists the
    holds (deleting expired ones): while any live hold exists it deletes
    nothing. It then lists everything it will delete and, given the writer's
    ``lease``, proves the lease is still held (:meth:`WriterLease.confirm`)
    after the listing and again whenever that proof is older than half a
    lease period, so a fenced writer stops before deleting anything: chunks a
    new writer stores after taking over are never in the listing, and with
    ``takeover="wait"`` no new writer can take over before the proof expires.
    """
    if promoted_lsn == 0:
        return Collected()
    live = await _holds.live_holds_or_collect(store, layout)
    if live:
        logger.info(
            "VPG %s: deletions up to promoted LSN %d deferred: %d live hold(s) (%s)",
            layout.vpg,
            promoted_lsn,
            len(live),
            ", ".join(f"{h.owner}/{h.purpose}" for h in live),
        )
        return Collected(deferred_by=tuple(live))
    doomed: list[str] = []
    async for info in store.list(layout.journals_prefix):
        if layout.parse_segment(info.key).last_lsn <= promoted_lsn:
            doomed.append(info.key)
    for vm, disk in await _mirror_disks(store, layout, disks):
        referenced: set[bytes] = set()
        async for info in store.list(layout.mirror_map_prefix(vm, disk)):
            lsn = layout.parse_mirror_map_lsn(info.key)
            if lsn < promoted_lsn:
                doomed.append(info.key)
                continue
            body = (await store.get(info.key)).data
            mirror = _format.decode_mirror_map(
                info.key, body, vpg=layout.vpg, vm=vm, disk=disk, lsn=lsn
            )
            referenced.update(mirror.chunks.values())
        async for info in store.list(layout.mirror_chunk_prefix(vm, disk)):
            if layout.parse_mirror_chunk(info.key) not in referenced:
                doomed.append(info.key)
    deadline = float("-inf")
    proving = asyncio.Lock()
    slots = asyncio.Semaphore(concurrency)

    async def delete(key: str) -> None:
        nonlocal deadline
        async with slots:
            async with proving:  # one proof at a time; the others wait and use it
                if lease is not None and monotonic() >= deadline:
                    deadline = await lease.confirm(monotonic)  # FencedError: stop (below)
            await store.delete(key)

    # ``concurrency`` deletes at a time (one by one, each would wait for its
    # own directory fsync), each started only inside a proof. The first
    # error (a FencedError) cancels the rest and is raised: nothing more is deleted.
    tasks = [asyncio.ensure_future(delete(key)) for key in doomed]
    try:
        for finished in asyncio.as_completed(tasks):
            await finished
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return Collected(deleted=len(doomed))


async def _mirror_disks(
    store: _base.ObjectStore, layout: _keys.VpgLayout, disks: dict[str, dict[str, int]] | None
) -> Iterable[tuple[str, str]]:
    """Every (vm, disk) with objects under ``mirror/`` (and those of ``disks``)."""
    found = {(vm, disk) for vm, sizes in (disks or {}).items() for disk in sizes}
    async for info in store.list(layout.mirrors_prefix):
        parts = info.key[len(layout.mirrors_prefix) :].split("/")
        if len(parts) == 4:
            found.add((parts[0], parts[1]))
    return sorted(found)
