"""One VM's in-memory journal buffer, sealed into immutable segments.

Writes, trims and zero-writes are appended with their VPG-wide LSN as they
arrive (cheap: a few array appends and one reference to the data). At each
checkpoint, or once the buffer passes ``segment_max_bytes``, it is sealed:
its rows become a :class:`SealedSegment` whose Arrow encoding happens off
the event loop and whose upload the runtime schedules. A buffer that holds
nothing but a checkpoint marker is not shipped on its own (see FORMAT.md:
idle journals cost no PUTs; the index records the cut for every journal).
"""

from __future__ import annotations

import array
import dataclasses

import numpy as np

from ebbtide_engine import _format, _keys


@dataclasses.dataclass(slots=True)
class SealedSegment:
    """Rows sealed from one VM's buffer, waiting to be encoded and uploaded."""

    vm: str
    first_lsn: int
    last_lsn: int
    payload_bytes: int  # bytes of write data it carries (what backpressure counts)
    rows: int
    _columns: tuple[array.array[int], ...]
    _data: list[bytes]
    _disks: tuple[str, ...]
    _vpg: str
    _epoch: int
    _previous_lsn: int

    def encode(self, layout: _keys.VpgLayout) -> tuple[str, bytes]:
        """The segment's key and Arrow IPC bytes (CPU-bound: call it in a worker thread)."""
        lsn, op, disk, offset, length, data_offsets = self._columns
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
            data=b"".join(self._data),
        )
        crc = _format.object_crc32c(body)
        return layout.segment(self.vm, self.first_lsn, self.last_lsn, self._epoch, crc), body


class JournalBuffer:
    """The unsealed tail of one VM's journal."""

    def __init__(self, layout: _keys.VpgLayout, vm: str, disks: list[str]) -> None:
        self._layout = layout
        self.vm = vm
        self.disks = tuple(disks)
        self._disk_index = {name: i for i, name in enumerate(disks)}
        self.position = 0  # last LSN sealed in this epoch (0: none yet)
        self._reset()

    def _reset(self) -> None:
        self._lsn: array.array[int] = array.array("Q")
        self._op: array.array[int] = array.array("B")
        self._disk: array.array[int] = array.array("H")
        self._offset: array.array[int] = array.array("Q")
        self._length: array.array[int] = array.array("Q")
        self._data_offsets: array.array[int] = array.array("q", [0])
        self._data: list[bytes] = []
        self.payload_bytes = 0
        self.has_changes = False

    def append(
        self, lsn: int, op: int, disk: str, offset: int, length: int, data: bytes = b""
    ) -> None:
        self._lsn.append(lsn)
        self._op.append(op)
        self._disk.append(self._disk_index[disk])
        self._offset.append(offset)
        self._length.append(length)
        if data:
            self._data.append(data)
            self.payload_bytes += len(data)
        self._data_offsets.append(self.payload_bytes)
        self.has_changes = True

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
            _data=self._data,
            _disks=self.disks,
            _vpg=vpg,
            _epoch=epoch,
            _previous_lsn=self.position,
        )
        self.position = last
        self._reset()
        return segment
