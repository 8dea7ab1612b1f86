"""The byte-range set that measures a mirror pass's progress, against a plain model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ebbtide_engine._endpoint import _disk

SPAN = 4096
ranges = st.lists(
    st.tuples(st.integers(0, SPAN - 1), st.integers(1, 512)).map(
        lambda r: (r[0], min(SPAN, r[0] + r[1]))
    ),
    max_size=60,
)


@given(ranges)
def test_covered_is_the_size_of_the_union(added: list[tuple[int, int]]) -> None:
    intervals = _disk.IntervalSet()
    model = bytearray(SPAN)
    for start, end in added:
        intervals.add(start, end)
        model[start:end] = b"\x01" * (end - start)
        assert intervals.covered == sum(model)
    # Touching and overlapping ranges merge: one range per run of covered bytes.
    runs = sum(1 for i in range(SPAN) if model[i] and (i == 0 or not model[i - 1]))
    assert len(intervals) == runs
