"""The bucket layout is a format: these exact strings may only change with FORMAT.md."""

from __future__ import annotations

import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _keys


def test_every_key_is_pinned() -> None:
    layout = _keys.VpgLayout("prod-db")
    assert layout.manifest == "vpgs/prod-db/manifest.json"
    assert layout.index_log_entry(42) == "vpgs/prod-db/index/log/00000000000000000042.arrow"
    assert layout.index_snapshot(7) == "vpgs/prod-db/index/snapshot/00000000000000000007.arrow"
    assert layout.journal_prefix("web-1") == "vpgs/prod-db/journal/web-1/"
    assert (
        layout.segment("web-1", 1, 300, 2, 0xDEADBEEF)
        == "vpgs/prod-db/journal/web-1/00000000000000000001-00000000000000000300"
        "-e0000000002-deadbeef.arrow"
    )
    assert (
        layout.mirror_map("web-1", "root", 300)
        == "vpgs/prod-db/mirror/web-1/root/map/00000000000000000300.arrow"
    )
    assert (
        layout.mirror_chunk("web-1", "root", bytes(range(32)))
        == "vpgs/prod-db/mirror/web-1/root/chunk/"
        "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f"
    )
    assert layout.hold("restore-1") == "vpgs/prod-db/holds/restore-1.json"
    assert layout.hold("restore-1").startswith(layout.holds_prefix)
    assert layout.parse_mirror_map_lsn(layout.mirror_map("w", "r", 7)) == 7
    assert layout.parse_mirror_chunk(layout.mirror_chunk("w", "r", b"\xab" * 32)) == b"\xab" * 32


def test_keys_sort_by_lsn_and_sequence_as_a_list_returns_them() -> None:
    layout = _keys.VpgLayout("v")
    segments = [layout.segment("vm", first, first + 5, 1, 0) for first in (9, 10, 99, 100, 1000)]
    assert sorted(segments) == segments
    entries = [layout.index_log_entry(seq) for seq in (1, 2, 10, 11, 2**63)]
    assert sorted(entries) == entries


def test_segment_names_parse_back_and_strays_are_refused() -> None:
    layout = _keys.VpgLayout("v")
    name = layout.parse_segment(layout.segment("db", 5, 9, 3, 0xABC))
    assert (name.vm, name.first_lsn, name.last_lsn, name.epoch, name.crc32c) == (
        "db",
        5,
        9,
        3,
        0xABC,
    )
    with pytest.raises(ebbtide.CorruptObjectError, match="not a journal segment name"):
        layout.parse_segment("vpgs/v/journal/db/notes.txt")
    assert layout.parse_index_seq(layout.index_log_entry(12)) == 12


@pytest.mark.parametrize("name", ["", "UPPER", "a/b", "-lead", "trail-", "x" * 64, "dot.ted"])
def test_names_that_would_break_keys_are_refused(name: str) -> None:
    with pytest.raises(ebbtide.SpecError, match="DNS-1123"):
        _keys.VpgLayout(name)
