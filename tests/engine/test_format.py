"""Arrow encodings: round trips, and no flipped byte is ever read as valid data."""

from __future__ import annotations

import numpy as np
import pytest

import ebbtide_engine as ebbtide
from ebbtide_engine import _format


def _segment() -> tuple[bytes, dict[str, object]]:
    rows = 5
    data = b"".join(bytes([i]) * (100 + i) for i in range(rows))
    lengths = [100 + i for i in range(rows)]
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    fields: dict[str, object] = {
        "vpg": "v",
        "vm": "web",
        "epoch": 3,
        "previous_lsn": 4,
        "disks": ["root", "data"],
        "lsn": np.arange(10, 10 + rows, dtype=np.uint64),
        "op": np.array([0, 0, 1, 2, 0], dtype=np.uint8),
        "disk": np.array([0, 1, 0, 1, 0], dtype=np.uint16),
        "offset": np.arange(rows, dtype=np.uint64) * 512,
        "length": np.array(lengths, dtype=np.uint64),
        "data_offsets": offsets,
        "data": data,
    }
    return _format.encode_journal_segment(**fields), fields  # type: ignore[arg-type]


def test_journal_segment_round_trip() -> None:
    body, fields = _segment()
    segment = _format.decode_journal_segment("k", body, crc=_format.object_crc32c(body))
    assert (segment.vpg, segment.vm, segment.epoch, segment.previous_lsn) == ("v", "web", 3, 4)
    assert (segment.first_lsn, segment.last_lsn, segment.disks) == (10, 14, ("root", "data"))
    assert segment.rows.lsn.tolist() == list(range(10, 15))
    assert bytes(segment.rows.data) == fields["data"]
    assert segment.rows.op.tolist() == [0, 0, 1, 2, 0]


def test_every_flipped_byte_of_a_segment_is_detected() -> None:
    body, _ = _segment()
    crc = _format.object_crc32c(body)
    for position in range(len(body)):
        damaged = bytearray(body)
        damaged[position] ^= 0x41
        with pytest.raises(ebbtide.CorruptObjectError):
            _format.decode_journal_segment("k", bytes(damaged), crc=crc)


def test_a_flipped_byte_of_an_index_entry_is_detected_or_harmless() -> None:
    records = [
        _format.IndexRecord(
            record=2,
            seq=5,
            lsn=77,
            time_ns=1,
            epoch=2,
            kind=1,
            tag="t",
            positions=(("web", 70), ("db", 0)),
        ),
        _format.IndexRecord(record=0, seq=5, lsn=1, time_ns=1, epoch=2, detail='{"vms": {}}'),
    ]
    body = _format.encode_index(records, vpg="v", fmt="index-log", seq=5)
    assert _format.decode_index("k", body, vpg="v", fmt="index-log", seq=5) == records
    detected = 0
    for position in range(len(body)):
        damaged = bytearray(body)
        damaged[position] ^= 0x41
        try:
            decoded = _format.decode_index("k", bytes(damaged), vpg="v", fmt="index-log", seq=5)
        except ebbtide.CorruptObjectError:
            detected += 1
            continue
        # Only bytes Arrow never reads (flatbuffer padding in the footer) may
        # flip unnoticed, and then what is read is exactly what was written.
        assert decoded == records, f"byte {position} changed the records undetected"
    assert detected > 0.9 * len(body)


def test_digest_ignores_layout_and_sees_values() -> None:
    import pyarrow as pa

    table = pa.table({"a": pa.array([1, 2, 3], pa.uint64()), "s": ["x", None, "zz"]})
    chunked = pa.concat_tables([table.slice(0, 1), table.slice(1)])
    assert _format.content_digest(table) == _format.content_digest(chunked)
    changed = pa.table({"a": pa.array([1, 2, 4], pa.uint64()), "s": ["x", None, "zz"]})
    assert _format.content_digest(table) != _format.content_digest(changed)
    null_moved = pa.table({"a": pa.array([1, 2, 3], pa.uint64()), "s": ["x", "", None]})
    assert _format.content_digest(table) != _format.content_digest(null_moved)


def test_an_unknown_format_version_is_refused() -> None:
    import pyarrow as pa

    body, _ = _segment()
    reader = pa.ipc.open_file(pa.py_buffer(body))
    table = reader.read_all()
    meta = dict(table.schema.metadata)
    meta[b"ebbtide.format_version"] = b"2"
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, table.schema.with_metadata(meta)) as writer:
        writer.write_table(table)
    future = bytes(sink.getvalue())
    with pytest.raises(ebbtide.CorruptObjectError, match="upgrade Ebbtide"):
        _format.decode_journal_segment("k", future, crc=_format.object_crc32c(future))
