"""Recovery disks (mirrors): each protected disk as of the promoted LSN, as chunk objects.

What is stored (FORMAT.md, "Recovery disks"), per VM ``vm`` and disk ``disk``:

- ``mirror/<vm>/<disk>/chunk/<sha256>``: ``chunk_size`` bytes of the disk (the
  last chunk may be shorter), named by the SHA-256 of its content, so a put
  is idempotent, unchanged chunks are shared between promotions, and a
  reader verifies every chunk against its name. All-zero chunks are not
  stored.
- ``mirror/<vm>/<disk>/map/<lsn>.arrow``: the chunk map of the disk at LSN
  ``lsn`` (an Arrow IPC file: chunk index -> SHA-256, plus disk and chunk
  size in the metadata; footer CRC like index objects).

The manifest's ``promoted_lsn`` says which maps are current; the index's
promotion record for that LSN holds the journal positions there, where the
segment chains of the remaining journal start.

This module holds what both the writer (promotion) and readers (recovery)
need: reading maps and chunks, and planning and verifying the journal
segments of a range of LSNs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os

from ebbtide_engine import _errors, _format, _index, _keys
from ebbtide_engine.storage import _base

DEFAULT_CHUNK_SIZE = 4 << 20


async def read_map(
    store: _base.ObjectStore, layout: _keys.VpgLayout, vm: str, disk: str, lsn: int
) -> _format.MirrorMap | None:
    """The chunk map of ``vm/disk`` at ``lsn``; None if there is none."""
    key = layout.mirror_map(vm, disk, lsn)
    try:
        stored = await store.get(key)
    except _errors.ObjectNotFound:
        return None
    return _format.decode_mirror_map(key, stored.data, vpg=layout.vpg, vm=vm, disk=disk, lsn=lsn)


async def required_map(
    store: _base.ObjectStore, layout: _keys.VpgLayout, vm: str, disk: str, lsn: int
) -> _format.MirrorMap:
    """The chunk map of a disk that existed at the promoted LSN: missing is corruption."""
    mirror = await read_map(store, layout, vm, disk, lsn)
    if mirror is None:
        raise _errors.CorruptObjectError(
            layout.mirror_map(vm, disk, lsn),
            f"the recovery disk of {vm}/{disk} at promoted LSN {lsn} is missing; "
            "the journal below that LSN was already promoted and deleted",
        )
    return mirror


async def read_chunk(
    store: _base.ObjectStore, layout: _keys.VpgLayout, vm: str, disk: str, digest: bytes
) -> bytes:
    """A chunk's bytes, verified against the SHA-256 in its name."""
    key = layout.mirror_chunk(vm, disk, digest)
    try:
        data = (await store.get(key)).data
    except _errors.ObjectNotFound:
        raise _errors.CorruptObjectError(key, "a chunk of a recovery disk is missing") from None
    if await asyncio.to_thread(_sha256, data) != digest:
        raise _errors.CorruptObjectError(key, "chunk content does not match its SHA-256 name")
    return data


def _sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


async def materialise(
    store: _base.ObjectStore,
    layout: _keys.VpgLayout,
    mirror: _format.MirrorMap,
    fd: int,
    size: int,
    *,
    prefetch: int = 4,
) -> int:
    """Write the recovery disk ``mirror`` into ``fd`` (a zero-filled image of ``size``).

    Returns the bytes read. Chunks beyond ``size`` (the disk shrank) are cut.
    """
    items = sorted(mirror.chunks.items())
    done = 0
    fetches: dict[int, asyncio.Task[bytes]] = {}
    try:
        for i, (index, _digest) in enumerate(items):
            for ahead in range(i, min(i + prefetch, len(items))):
                if ahead not in fetches:
                    fetches[ahead] = asyncio.ensure_future(
                        read_chunk(store, layout, mirror.vm, mirror.disk, items[ahead][1])
                    )
            data = await fetches.pop(i)
            offset = index * mirror.chunk_size
            if offset < size:
                part = data[: size - offset]
                await asyncio.to_thread(os.pwrite, fd, part, offset)
            done += len(data)
    finally:
        for task in fetches.values():
            task.cancel()
    return done


@dataclasses.dataclass(slots=True)
class PlannedSegment:
    vm: str
    name: _keys.SegmentName
    key: str
    size: int
    range: _index.EpochRange


async def plan_vm(
    store: _base.ObjectStore, layout: _keys.VpgLayout, vm: str, ranges: list[_index.EpochRange]
) -> list[PlannedSegment]:
    """The segments of ``vm`` that ``ranges`` need, in (epoch range, LSN) order."""
    by_epoch = {r.epoch: r for r in ranges}
    plan = []
    async for info in store.list(layout.journal_prefix(vm)):
        name = layout.parse_segment(info.key)
        r = by_epoch.get(name.epoch)
        if r is None or r.end is None or name.first_lsn > r.end or name.last_lsn < r.start:
            continue
        plan.append(PlannedSegment(vm=vm, name=name, key=info.key, size=info.size, range=r))
    order = {r.epoch: i for i, r in enumerate(ranges)}
    plan.sort(key=lambda item: (order[item.name.epoch], item.name.first_lsn))
    return plan


def decode_segment(item: PlannedSegment, body: bytes) -> _format.JournalSegment:
    """Decode and verify a planned segment against its name (any order, any thread)."""
    segment = _format.decode_journal_segment(item.key, body, crc=item.name.crc32c)
    name = item.name
    if (segment.first_lsn, segment.last_lsn, segment.epoch, segment.vm) != (
        name.first_lsn,
        name.last_lsn,
        name.epoch,
        item.vm,
    ):
        raise _errors.CorruptObjectError(item.key, "its contents do not match its name")
    return segment


class ChainCheck:
    """Verifies that each (VM, epoch) chain of segments links up without gaps."""

    def __init__(self) -> None:
        self.last: dict[tuple[str, int], int] = {}

    def decode(self, item: PlannedSegment, body: bytes) -> _format.JournalSegment:
        """Decode ``body`` and check it against its name and its place in the chain."""
        segment = decode_segment(item, body)
        self.link(item, segment)
        return segment

    def link(self, item: PlannedSegment, segment: _format.JournalSegment) -> None:
        """Check a decoded segment's place in its chain (call in plan order)."""
        name = item.name
        chain_key = (item.vm, name.epoch)
        start = (item.range.start_positions or {}).get(item.vm, 0)
        expected = self.last.get(chain_key, start)
        if segment.previous_lsn != expected:
            raise _errors.CorruptObjectError(
                item.key,
                f"journal chain broken: it follows LSN {segment.previous_lsn}, but the last "
                f"segment found for VM {item.vm!r} (epoch {name.epoch}) ends at {expected}; "
                "a segment is missing from the bucket",
            )
        self.last[chain_key] = segment.last_lsn

    def check_ends(self, vms: list[str], ranges: list[_index.EpochRange]) -> None:
        """Every VM's journal must reach the position each range's end recorded for it."""
        for r in ranges:
            for vm in vms:
                want = (r.end_positions or {}).get(vm, 0)
                have = self.last.get((vm, r.epoch), (r.start_positions or {}).get(vm, 0))
                if want != have:
                    raise _errors.CorruptObjectError(
                        f"journal of VM {vm!r}",
                        f"checkpoint {r.end} needs its writes up to LSN {want} (epoch {r.epoch}) "
                        f"but the segments in the bucket end at {have}; a segment is missing",
                    )
