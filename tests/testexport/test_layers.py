"""The maps and the cache a test export reads through, against brute-force models."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ebbtide_engine._testexport import _cache, _extents

SIZE = 200

rows_strategy = st.lists(
    st.tuples(st.integers(0, SIZE + 20), st.integers(0, 60)), min_size=0, max_size=40
)


@settings(max_examples=300, deadline=None)
@given(rows=rows_strategy, start=st.integers(0, SIZE), length=st.integers(0, SIZE))
def test_journal_extents_give_the_last_row_of_every_byte(
    rows: list[tuple[int, int]], start: int, length: int
) -> None:
    expected = [-1] * SIZE
    for row, (offset, size) in enumerate(rows):
        for byte in range(offset, min(offset + size, SIZE)):
            expected[byte] = row  # later rows win
    offsets = np.array([offset for offset, _ in rows], dtype=np.uint64)
    lengths = np.array([size for _, size in rows], dtype=np.uint64)
    extents = _extents.JournalExtents.build(offsets, lengths, size=SIZE)  # type: ignore[arg-type]
    # Disjoint, sorted, no empty extents, adjacent extents of one row merged.
    assert all(extents.starts < extents.ends)
    assert all(extents.ends[:-1] <= extents.starts[1:])
    for i in range(len(extents) - 1):
        if extents.ends[i] == extents.starts[i + 1]:
            assert extents.rows[i] != extents.rows[i + 1]
    end = min(SIZE, start + length)
    got = [-2] * SIZE
    position = start
    for piece_start, piece_end, row in extents.pieces(start, end):
        assert piece_start == position < piece_end  # contiguous, in order, non-empty
        got[piece_start:piece_end] = [row] * (piece_end - piece_start)
        position = piece_end
    assert position == max(start, end)
    assert got[start:end] == expected[start:end]


@settings(max_examples=300, deadline=None)
@given(
    added=st.lists(st.tuples(st.integers(0, SIZE), st.integers(0, 40)), max_size=30),
    start=st.integers(0, SIZE),
    length=st.integers(0, SIZE),
)
def test_range_set_pieces_and_coverage(
    added: list[tuple[int, int]], start: int, length: int
) -> None:
    ranges = _extents.RangeSet()
    inside = [False] * (3 * SIZE)
    for offset, size in added:
        ranges.add(offset, offset + size)
        inside[offset : offset + size] = [True] * size
    assert ranges.covered == sum(inside)
    end = start + length
    got: list[bool] = []
    position = start
    for piece_start, piece_end, flag in ranges.pieces(start, end):
        assert piece_start == position < piece_end
        got.extend([flag] * (piece_end - piece_start))
        position = piece_end
    assert got == inside[start:end]


async def test_cache_fetches_each_object_once_for_concurrent_readers() -> None:
    cache = _cache.ObjectCache(100)
    calls: list[str] = []
    release = asyncio.Event()

    async def load() -> tuple[bytes, int]:
        calls.append("a")
        await release.wait()
        return b"value", 10

    readers = [asyncio.ensure_future(cache.get("a", load)) for _ in range(5)]
    await asyncio.sleep(0)
    readers[0].cancel()  # one reader giving up does not cancel the others' fetch
    release.set()
    results = await asyncio.gather(*readers[1:])
    assert results == [b"value"] * 4
    assert calls == ["a"]
    assert await cache.get("a", load) == b"value"  # now cached
    assert calls == ["a"]


async def test_cache_evicts_least_recently_used_and_keeps_failures_out() -> None:
    cache = _cache.ObjectCache(25)
    loads: list[str] = []

    def loader(key: str, size: int) -> _cache.Loader[str]:
        async def load() -> tuple[str, int]:
            loads.append(key)
            return key, size

        return load

    await cache.get("a", loader("a", 10))
    await cache.get("b", loader("b", 10))
    await cache.get("a", loader("a", 10))  # a is now the most recent
    await cache.get("c", loader("c", 10))  # over 25: b goes
    assert cache.used == 20
    await cache.get("a", loader("a", 10))
    await cache.get("b", loader("b", 10))
    assert loads == ["a", "b", "c", "b"]
    assert await cache.get("huge", loader("huge", 1000)) == "huge"  # served, not kept
    assert "huge" not in cache
    assert cache.used <= 25

    async def failing() -> tuple[str, int]:
        raise OSError("bucket unreachable")

    with pytest.raises(OSError, match="unreachable"):
        await cache.get("d", failing)
    assert await cache.get("d", loader("d", 1)) == "d"  # the failure was not cached
    await cache.close()
