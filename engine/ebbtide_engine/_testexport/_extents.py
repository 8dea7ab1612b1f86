"""Which layer holds each byte of a test export: the journal extent map and the overlay's ranges.

A test export reads a disk as of a checkpoint through three layers (the
scratch overlay, the journal above the promoted LSN, the recovery disk's
chunks). This module holds the two maps that decide, for a byte range,
which layer answers:

- :class:`JournalExtents`: for every byte the journal rows touch, the row
  that wrote it last (later LSNs win where rows overlap), as sorted,
  disjoint extents in numpy arrays. Built once per disk when the export
  opens; looking a range up is a binary search.
- :class:`RangeSet`: the byte ranges the test VMs wrote, trimmed or zeroed
  in the scratch overlay (disjoint, merged as they are added). Kept in
  memory only: the overlay is scratch and goes with the export.
"""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np

Int64Array = np.ndarray[Any, np.dtype[np.int64]]


@dataclasses.dataclass(frozen=True, slots=True)
class JournalExtents:
    """Disjoint extents ``[starts[i], ends[i])``, each written last by journal row ``rows[i]``.

    Row numbers index the arrays the map was built from (in LSN order); what a
    row is (a write and where its bytes are, or a zeroing) is the caller's.
    """

    starts: Int64Array
    ends: Int64Array
    rows: Int64Array

    @classmethod
    def empty(cls) -> JournalExtents:
        none = np.zeros(0, dtype=np.int64)
        return cls(starts=none, ends=none, rows=none)

    @classmethod
    def build(cls, offsets: Int64Array, lengths: Int64Array, *, size: int) -> JournalExtents:
        """The extent map of rows ``i`` covering ``[offsets[i], offsets[i] + lengths[i])``.

        Rows must be in LSN order; a later row wins wherever it overlaps an
        earlier one. Ranges are clipped to ``size`` (a disk that shrank).

        How: the row boundaries cut the disk into elementary cells; rows are
        visited newest first and each claims the cells of its range nobody
        claimed yet, skipping claimed runs with a union-find "next free
        cell" array. That is O(rows + cells) whatever the overlap pattern,
        where repainting sorted lists would cost O(extents) per row.
        """
        starts = np.minimum(offsets.astype(np.int64), size)
        ends = np.minimum(starts + lengths.astype(np.int64), size)
        keep = ends > starts
        if not keep.any():
            return cls.empty()
        row_ids = np.nonzero(keep)[0].astype(np.int64)
        starts, ends = starts[keep], ends[keep]
        bounds = np.unique(np.concatenate([starts, ends]))
        lo = np.searchsorted(bounds, starts).tolist()
        hi = np.searchsorted(bounds, ends).tolist()
        cells = len(bounds) - 1
        winner = [-1] * cells
        free = list(range(cells + 1))  # free[i] leads to the first unclaimed cell >= i
        for r in range(len(lo) - 1, -1, -1):
            i, stop = lo[r], hi[r]
            while i < stop:
                root = i
                while free[root] != root:
                    root = free[root]
                while free[i] != root:  # path compression
                    free[i], i = root, free[i]
                if root >= stop:
                    break
                winner[root] = r
                free[root] = root + 1
                i = root + 1
        won = np.asarray(winner, dtype=np.int64)
        claimed = won >= 0
        same_as_previous = np.zeros(cells, dtype=bool)
        same_as_previous[1:] = won[1:] == won[:-1]
        same_as_next = np.zeros(cells, dtype=bool)
        same_as_next[:-1] = same_as_previous[1:]
        first_cells = np.nonzero(claimed & ~same_as_previous)[0]
        last_cells = np.nonzero(claimed & ~same_as_next)[0]
        return cls(
            starts=bounds[first_cells],
            ends=bounds[last_cells + 1],
            rows=row_ids[won[first_cells]],
        )

    def __len__(self) -> int:
        return len(self.starts)

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(piece_start, piece_end, row)`` covering ``[start, end)`` in order; row -1: a gap."""
        i = int(np.searchsorted(self.ends, start, side="right"))
        position = start
        while position < end and i < len(self.starts):
            extent_start = int(self.starts[i])
            if extent_start >= end:
                break
            if extent_start > position:
                yield position, extent_start, -1
                position = extent_start
            piece_end = min(end, int(self.ends[i]))
            yield position, piece_end, int(self.rows[i])
            position = piece_end
            i += 1
        if position < end:
            yield position, end, -1


class RangeSet:
    """Disjoint byte ranges, merged as they are added; ``covered`` is their total length."""

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._ends: list[int] = []
        self.covered = 0

    def add(self, start: int, end: int) -> None:
        if end <= start:
            return
        first = bisect.bisect_left(self._ends, start)  # ranges that end at or after start
        stop = bisect.bisect_right(self._starts, end)  # ranges that start at or before end
        removed = 0
        if first < stop:
            removed = sum(self._ends[first:stop]) - sum(self._starts[first:stop])
            start = min(start, self._starts[first])
            end = max(end, self._ends[stop - 1])
        self._starts[first:stop] = [start]
        self._ends[first:stop] = [end]
        self.covered += end - start - removed

    def pieces(self, start: int, end: int) -> Iterator[tuple[int, int, bool]]:
        """``(piece_start, piece_end, inside)`` covering ``[start, end)`` in order."""
        i = bisect.bisect_right(self._ends, start)
        position = start
        while position < end and i < len(self._starts) and self._starts[i] < end:
            if self._starts[i] > position:
                yield position, self._starts[i], False
                position = self._starts[i]
            piece_end = min(end, self._ends[i])
            yield position, piece_end, True
            position = piece_end
            i += 1
        if position < end:
            yield position, end, False

    def __len__(self) -> int:
        return len(self._starts)
