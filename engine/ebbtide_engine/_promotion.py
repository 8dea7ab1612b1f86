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
   so any later pass can redo it.

Checkpoints below ``P`` stop being listed at once (readers prune by the
manifest); the index rewrite that drops their records follows in the same
maintenance pass.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
from collections.abc import Iterable

import numpy as np

from ebbtide_engine import _errors, _format, _index, _keys, _lease, _mirror
from ebbtide_engine.storage import _base

_PUT_ATTEMPTS = 5  # per chunk; a pass that still fails is simply run again later


@dataclasses.dataclass(frozen=True, slots=True)
class Promotion:
    """What one promotion did."""

    promoted_lsn: int  # now in the manifest (unchanged if nothing was promoted)
    segments_applied: int = 0
    bytes_applied: int = 0  # journal bytes read and applied
    chunks_stored: int = 0
    objects_deleted: int = 0


class _Disk:
    """One recovery disk being patched: a bounded cache of dirty chunks."""

    def __init__(self, promoter: _Promoter, vm: str, disk: str, size: int, base: dict[int, bytes]):
        self.promoter = promoter
        self.vm, self.disk, self.size = vm, disk, size
        self.chunks = dict(base)  # chunk index -> sha256 (absent: zeros)
        self.dirty: collections.OrderedDict[int, bytearray] = collections.OrderedDict()

    async def chunk(self, index: int) -> bytearray:
        buffer = self.dirty.get(index)
        if buffer is not None:
            self.dirty.move_to_end(index)
            return buffer
        size = self.promoter.chunk_size
        length = min(size, self.size - index * size)
        digest = self.chunks.get(index)
        if digest is None:
            buffer = bytearray(length)
        else:
            data = await _mirror.read_chunk(
                self.promoter.store, self.promoter.layout, self.vm, self.disk, digest
            )
            buffer = bytearray(data[:length].ljust(length, b"\0"))
        self.dirty[index] = buffer
        await self.promoter.make_room(self, index)
        return buffer

    async def apply(self, op: int, offset: int, length: int, data: memoryview | None) -> None:
        size = self.promoter.chunk_size
        end = min(offset + length, self.size)
        while offset < end:
            index, start = divmod(offset, size)
            count = min(size - start, end - offset)
            buffer = await self.chunk(index)
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
        self.slots = asyncio.Semaphore(concurrency)
        self.stored = 0
        self.zero = bytes(chunk_size)

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

    async def store_chunk(self, disk: _Disk, index: int, buffer: bytearray) -> None:
        """Record the chunk's new content and store it (in the background, bounded)."""
        if buffer == self.zero[: len(buffer)]:
            disk.chunks.pop(index, None)
            return
        data = bytes(buffer)
        digest = await asyncio.to_thread(lambda: hashlib.sha256(data).digest())
        disk.chunks[index] = digest
        await self.slots.acquire()
        put = asyncio.ensure_future(self._put(disk, digest, data))
        self.puts.add(put)
        put.add_done_callback(self.puts.discard)

    async def _put(self, disk: _Disk, digest: bytes, data: bytes) -> None:
        key = self.layout.mirror_chunk(disk.vm, disk.disk, digest)
        try:
            for attempt in range(_PUT_ATTEMPTS):
                try:
                    await self.store.put_new(key, data)
                    self.stored += 1
                    return
                except _errors.ObjectExists:
                    return  # content-addressed: the same bytes are there already
                except _errors.StorageError:
                    if attempt == _PUT_ATTEMPTS - 1:
                        raise
                    await asyncio.sleep(0.05 * 2**attempt)
        finally:
            self.slots.release()

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


async def promote(
    store: _base.ObjectStore,
    layout: _keys.VpgLayout,
    index: _index.IndexWriter,
    lease: _lease.WriterLease,
    target: int,
    *,
    time_ns: int,
    chunk_size: int = _mirror.DEFAULT_CHUNK_SIZE,
    memory_bytes: int = 256 << 20,
    concurrency: int = 8,
    prefetch: int = 4,
) -> Promotion:
    """Promote every write up to checkpoint ``target`` (see the module docstring)."""
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
            if len(promoter.zero) != promoter.chunk_size:
                promoter.zero = bytes(promoter.chunk_size)
            plan = await _mirror.plan_vm(store, layout, vm, ranges)
            chain = _mirror.ChainCheck()
            fetches: dict[int, asyncio.Task[_base.StoredObject]] = {}
            try:
                for i, item in enumerate(plan):
                    for ahead in range(i, min(i + prefetch, len(plan))):
                        if ahead not in fetches:
                            fetches[ahead] = asyncio.ensure_future(store.get(plan[ahead].key))
                    body = (await fetches.pop(i)).data
                    segment = await asyncio.to_thread(chain.decode, item, body)
                    await _apply(segment, item.range, disks)
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
    record = _format.IndexRecord(
        record=_format.RECORD_PROMOTION,
        seq=0,
        lsn=target,
        time_ns=time_ns,
        epoch=lease.epoch,
        positions=tuple(sorted(positions.items())),
    )
    await index.append_retrying([record])
    await lease.update(lambda m: dataclasses.replace(m, promoted_lsn=target))
    index.state.prune_below(target)
    deleted = await collect_garbage(store, layout, target, disks_now)
    return Promotion(
        promoted_lsn=target,
        segments_applied=segments,
        bytes_applied=applied,
        chunks_stored=promoter.stored,
        objects_deleted=deleted,
    )


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


async def collect_garbage(
    store: _base.ObjectStore,
    layout: _keys.VpgLayout,
    promoted_lsn: int,
    disks: dict[str, dict[str, int]] | None = None,
) -> int:
    """Delete what ``promoted_lsn`` made dead; idempotent. Returns the objects deleted.

    Journal segments entirely at or below it, chunk maps below it, and chunks
    that no map at or above it references (maps above it are left by an
    interrupted promotion; they are deleted once promotion passes them).
    """
    if promoted_lsn == 0:
        return 0
    deleted = 0
    async for info in store.list(layout.journals_prefix):
        if layout.parse_segment(info.key).last_lsn <= promoted_lsn:
            await store.delete(info.key)
            deleted += 1
    for vm, disk in await _mirror_disks(store, layout, disks):
        referenced: set[bytes] = set()
        async for info in store.list(layout.mirror_map_prefix(vm, disk)):
            lsn = layout.parse_mirror_map_lsn(info.key)
            if lsn < promoted_lsn:
                await store.delete(info.key)
                deleted += 1
                continue
            body = (await store.get(info.key)).data
            mirror = _format.decode_mirror_map(
                info.key, body, vpg=layout.vpg, vm=vm, disk=disk, lsn=lsn
            )
            referenced.update(mirror.chunks.values())
        async for info in store.list(layout.mirror_chunk_prefix(vm, disk)):
            if layout.parse_mirror_chunk(info.key) not in referenced:
                await store.delete(info.key)
                deleted += 1
    return deleted


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
