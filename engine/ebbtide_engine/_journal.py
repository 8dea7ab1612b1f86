"""One VM's in-memory journal buffer, sealed into immutable segments.

Writes, trims and zero-writes are appended with their VPG-wide LSN as they
arrive: a few array appends, and a write's bytes copied once into the
buffer's *arena*, one contiguous data area per segment. The arena is what
the Arrow encoding references (no join of the writes), and arenas come from
an :class:`ArenaPool` and go back to it once their segment is encoded, so
the write path does not pay for fresh multi-megabyte allocations (page
faults) on every segment. The caller may therefore pass a view of a buffer
it reuses (the NBD receive buffer): nothing here keeps a reference to it.

At each checkpoint, or once the buffer reaches ``segment_max_bytes``, it is
sealed: its rows become a :class:`SealedSegment`, which the runtime encodes
off the event loop and uploads. A buffer that holds nothing but a checkpoint
marker is not shipped on its own (see FORMAT.md: idle journals cost no PUTs;
the index records the cut for every journal).
"""

from __future__ import annotations

import array
import dataclasses
import mmap

import numpy as np

from ebbtide_engine import _format, _keys

#: What a write's data may be: anything contiguous that ``memoryview`` accepts.
Data = bytes | bytearray | memoryview


class ArenaPool:
    """Data areas of ``size`` bytes, reused (a fresh 16 MiB buffer costs ~4,000 page faults).

    An arena is an anonymous memory map: only the pages written use memory,
    so a VM that buffers 4 KiB holds 4 KiB, not a whole segment. Keeps at
    most ``keep`` free arenas; larger requests get a one-off arena that is
    not kept. Used from the event loop only.
    """

    def __init__(self, size: int, keep: int = 3) -> None:
        self.size = size
        self.keep = keep
        self._free: list[mmap.mmap] = []

    def take(self, minimum: int) -> mmap.mmap:
        if minimum <= self.size:
            return self._free.pop() if self._free else mmap.mmap(-1, self.size)
        return mmap.mmap(-1, minimum)

    def give(self, arena: mmap.mmap) -> None:
        if len(arena) == self.size and len(self._free) < self.keep:
            self._free.append(arena)


@dataclasses.dataclass(slots=True)
class SealedSegment:
    """Rows sealed from one VM's buffer, waiting to be encoded and uploaded."""

    vm: str
    first_lsn: int
    last_lsn: int
    payload_bytes: int  # bytes of write data it carries
    rows: int
    _columns: tuple[array.array[int], ...] | None
    _arena: mmap.mmap | None
    _disks: tuple[str, ...]
    _vpg: str
    _epoch: int
    _previous_lsn: int

    def encode(self, layout: _keys.VpgLayout) -> tuple[str, bytes]:
        """The segment's key and Arrow IPC bytes (CPU-bound: call it in a worker thread)."""
        assert self._columns is not None, "segment already released"
        lsn, op, disk, offset, length, data_offsets = self._columns
        data = memoryview(self._arena or b"")[: self.payload_bytes]
        body = _format.encode_journal_segment(
            vpg=self._vpg,
            vm=self.vm,
            epoch=self._epoch,
            previous_lsn=self._previous_lsn,
            disks=self._disks,
            lsn=np.frombuffer(lsn, dtype=np.uint64),
            op=np.frombuffer(op, dtype=np.uint8),
            disk=np.frombuffer(disk, dtype=np.uint16),
            offset=np.frombuffer(offset, dtype=np.uint64),
            length=np.frombuffer(length, dtype=np.uint64),
            data_offsets=np.frombuffer(data_offsets, dtype=np.int64),
            data=data,
        )
        crc = _format.object_crc32c(body)
        return layout.segment(self.vm, self.first_lsn, self.last_lsn, self._epoch, crc), body

    def release(self, pool: ArenaPool | None = None) -> None:
        """Drop the rows once encoded; the arena goes back to ``pool`` for reuse."""
        arena, self._arena, self._columns = self._arena, None, None
        if arena is not None and pool is not None:
            pool.give(arena)


class JournalBuffer:
    """The unsealed tail of one VM's journal."""

    def __init__(
        self,
        layout: _keys.VpgLayout,
        vm: str,
        disks: list[str],
        pool: ArenaPool | None = None,
    ) -> None:
        self._layout = layout
        self.vm = vm
        self.disks = tuple(disks)
        self._disk_index = {name: i for i, name in enumerate(disks)}
        self._pool = pool or ArenaPool(16 << 20, keep=0)
        self.position = 0  # last LSN sealed in this epoch (0: none yet)
        self._reset()

    def _reset(self) -> None:
        self._lsn: array.array[int] = array.array("Q")
        self._op: array.array[int] = array.array("B")
        self._disk: array.array[int] = array.array("H")
        self._offset: array.array[int] = array.array("Q")
        self._length: array.array[int] = array.array("Q")
        self._data_offsets: array.array[int] = array.array("q", [0])
        self._arena: mmap.mmap | None = None
        self.payload_bytes = 0
        self.has_changes = False

    def append(
        self, lsn: int, op: int, disk: str, offset: int, length: int, data: Data = b""
    ) -> None:
        """Append one row; a write's ``data`` is copied (the caller may reuse its buffer)."""
        size = len(data) if isinstance(data, bytes | bytearray) else memoryview(data).nbytes
        if size:
            self._store(data, size)
        self._lsn.append(lsn)
        self._op.append(op)
        self._disk.append(self._disk_index[disk])
        self._offset.append(offset)
        self._length.append(length)
        self._data_offsets.append(self.payload_bytes)
        self.has_changes = True

    def _store(self, data: Data, size: int) -> None:
        start, end = self.payload_bytes, self.payload_bytes + size
        arena = self._arena
        if arena is None or len(arena) < end:
            grown = self._pool.take(end)
            if arena is not None:
                grown[:start] = memoryview(arena)[:start]
                self._pool.give(arena)
            self._arena = arena = grown
        arena[start:end] = data
        self.payload_bytes = end

    def mark(self, lsn: int) -> None:
        """Append a checkpoint marker (only to a buffer that holds changes)."""
        if self.has_changes:
            self._lsn.append(lsn)
            self._op.append(_format.OP_CHECKPOINT)
            self._disk.append(0)
            self._offset.append(0)
            self._length.append(0)
            self._data_offsets.append(self.payload_bytes)

    def seal(self, *, vpg: str, epoch: int) -> SealedSegment | None:
        """Hand the buffered rows over as a segment and start a new buffer."""
        if not self.has_changes:
            return None
        first, last = self._lsn[0], self._lsn[-1]
        segment = SealedSegment(
            vm=self.vm,
            first_lsn=first,
            last_lsn=last,
            payload_bytes=self.payload_bytes,
            rows=len(self._lsn),
            _columns=(
                self._lsn,
                self._op,
                self._disk,
                self._offset,
                self._length,
                self._data_offsets,
            ),
            _arena=self._arena,
            _disks=self.disks,
            _vpg=vpg,
            _epoch=epoch,
            _previous_lsn=self.position,
        )
        self.position = last
        self._reset()
        return segment
