"""Arrow IPC encodings of journal segments and checkpoint-index objects.

Both are Arrow IPC *files* (random access, footer at the end: a truncated
object fails to open), with zstd buffer compression where it pays. Every
byte of every object is covered by a CRC-32C checked before it is decoded:
a journal segment's whole-object CRC is part of its key; an index object's
CRC of everything before its footer is in the footer's custom metadata
(``ebbtide.body_crc32c``), and the footer itself is what the checks below
read. They carry in their schema metadata:

- ``ebbtide.format``: ``journal-segment``, ``index-log`` or ``index-snapshot``;
- ``ebbtide.format_version``: ``1`` (a reader refuses versions it does not know);
- ``ebbtide.crc32c``: the CRC-32C of the table's *logical content* (see
  :func:`content_digest`), verified on every read, so a flipped bit anywhere
  in the data or the numbers is reported with the object's key;
- per-kind fields (VPG, VM, epoch, LSN range, disk names, sequence number),
  cross-checked against the key the object was read from.

The exact schemas are in FORMAT.md; this module is their one implementation.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping
from typing import Any

import crc32c
import numpy as np

# pa.array() of a numpy array imports numpy.ma on first use: import it with this
# module, not under the GIL inside the first segment encoded during a write burst.
import numpy.ma
import pyarrow as pa

from ebbtide_engine import _errors

FORMAT_VERSION = 1

OP_WRITE = 0
OP_TRIM = 1
OP_ZERO = 2
OP_CHECKPOINT = 3

JOURNAL_SCHEMA = pa.schema(
    [
        pa.field("lsn", pa.uint64(), nullable=False),
        pa.field("op", pa.uint8(), nullable=False),
        pa.field("disk", pa.uint16(), nullable=False),
        pa.field("offset", pa.uint64(), nullable=False),
        pa.field("length", pa.uint64(), nullable=False),
        pa.field("data", pa.large_binary(), nullable=False),
    ]
)

RECORD_CONFIG = 0
RECORD_TAKEOVER = 1
RECORD_CHECKPOINT = 2
RECORD_SHUTDOWN = 3
RECORD_PROMOTION = 4
RECORD_REWRITE = 5

INDEX_SCHEMA = pa.schema(
    [
        pa.field("record", pa.uint8(), nullable=False),
        pa.field("seq", pa.uint64(), nullable=False),
        pa.field("lsn", pa.uint64(), nullable=False),
        pa.field("time_ns", pa.int64(), nullable=False),
        pa.field("epoch", pa.uint32(), nullable=False),
        pa.field("kind", pa.uint8(), nullable=False),
        pa.field("tag", pa.string(), nullable=True),
        pa.field("detail", pa.string(), nullable=True),
        pa.field(
            "positions",
            pa.list_(
                pa.struct(
                    [
                        pa.field("journal", pa.string(), nullable=False),
                        pa.field("lsn", pa.uint64(), nullable=False),
                    ]
                )
            ),
            nullable=True,
        ),
    ]
)

_COMPRESSION = pa.Codec("zstd", compression_level=1)
_SAMPLE = 16 << 10  # bytes per sample when probing whether data compresses


# --- integrity -------------------------------------------------------------


def content_digest(table: pa.Table) -> str:
    """CRC-32C of a table's logical content, independent of how Arrow laid it out.

    Column by column: validity as packed bits, fixed-width values as
    little-endian bytes (null slots zeroed), variable-size values as
    offsets rebased to zero plus the referenced bytes, lists and structs
    recursively. Two tables with equal values have equal digests whatever
    their chunking, slicing or compression.
    """
    checksum = crc32c.CRC32CHash()
    for column in table.columns:
        _digest_array(column.combine_chunks(), checksum)
    return checksum.hexdigest()


def _digest_array(array: pa.Array, checksum: crc32c.CRC32CHash) -> None:
    if array.null_count:
        checksum.update(np.packbits(array.is_valid().to_numpy(zero_copy_only=False)).tobytes())
    kind = array.type
    if pa.types.is_large_binary(kind) or pa.types.is_string(kind) or pa.types.is_binary(kind):
        width = np.int64 if pa.types.is_large_binary(kind) else np.int32
        buffers = array.buffers()
        offsets = np.frombuffer(buffers[1], dtype=width)[
            array.offset : array.offset + len(array) + 1
        ]
        checksum.update((offsets - offsets[0]).astype(np.int64).tobytes())
        if buffers[2] is not None and len(offsets) and offsets[-1] > offsets[0]:
            checksum.update(memoryview(buffers[2])[int(offsets[0]) : int(offsets[-1])])
    elif pa.types.is_fixed_size_binary(kind):
        width = kind.byte_width
        start = array.offset * width
        checksum.update(memoryview(array.buffers()[1])[start : start + len(array) * width])
    elif pa.types.is_list(kind):
        offsets = array.offsets.to_numpy()
        checksum.update((offsets - offsets[0]).astype(np.int64).tobytes())
        _digest_array(array.values.slice(int(offsets[0]), int(offsets[-1] - offsets[0])), checksum)
    elif pa.types.is_struct(kind):
        for index in range(kind.num_fields):
            _digest_array(array.field(index), checksum)
    else:
        values = array.fill_null(0) if array.null_count else array
        checksum.update(
            values.to_numpy(zero_copy_only=False).astype(kind.to_pandas_dtype()).tobytes()
        )


# --- encoding helpers --------------------------------------------------------


def _worth_compressing(data: bytes | memoryview) -> bool:
    """Probe a few slices: random (or encrypted) data is stored uncompressed.

    zstd on incompressible bytes costs ~30 ms per 16 MiB and saves nothing;
    the probe costs well under a millisecond.
    """
    if len(data) <= 4 * _SAMPLE:
        return True
    view = memoryview(data)
    step = len(data) // 4
    sample = b"".join(view[i * step : i * step + _SAMPLE] for i in range(4))
    return len(pa.compress(sample, codec=_COMPRESSION.name, asbytes=True)) < 0.9 * len(sample)


def object_crc32c(body: bytes) -> int:
    """CRC-32C of a whole stored object (a journal segment's key carries it)."""
    return int(crc32c.crc32c(body))


def _footer_start(body: bytes) -> int:
    """Offset of an Arrow IPC file's footer (the file ends: footer, int32 length, ARROW1)."""
    length = int.from_bytes(body[-10:-6], "little", signed=True)
    return len(body) - 10 - length


def _encode(
    table: pa.Table,
    metadata: Mapping[str, str],
    *,
    compress: bool = True,
    footer_crc: bool = False,
) -> bytes:
    meta = {
        "ebbtide.format_version": str(FORMAT_VERSION),
        "ebbtide.crc32c": content_digest(table),
        **metadata,
    }
    table = table.replace_schema_metadata({k.encode(): v.encode() for k, v in meta.items()})
    options = pa.ipc.IpcWriteOptions(compression=_COMPRESSION if compress else None)

    def write(footer: dict[bytes, bytes] | None) -> bytes:
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema, options=options, metadata=footer) as writer:
            writer.write_table(table, max_chunksize=1 << 16)
        return bytes(sink.getvalue())

    body = write(None)
    if not footer_crc:
        return body
    # Everything before the footer does not depend on the footer: write again
    # with the CRC of that part in the footer (cheap: index objects are small).
    prefix = body[: _footer_start(body)]
    final = write({b"ebbtide.body_crc32c": f"{object_crc32c(prefix):08x}".encode()})
    assert final.startswith(prefix)
    return final


def _decode(
    key: str,
    body: bytes,
    expected_format: str,
    schema: pa.Schema,
    *,
    object_crc: int | None = None,
) -> tuple[pa.Table, dict[str, str]]:
    if object_crc is not None and object_crc32c(body) != object_crc:
        raise _errors.CorruptObjectError(
            key,
            f"object checksum mismatch (its name says crc32c {object_crc:08x}, content has "
            f"{object_crc32c(body):08x})",
        )
    try:
        reader = pa.ipc.open_file(pa.py_buffer(body))
        if object_crc is None:
            footer = reader.metadata or {}
            stored = footer.get(b"ebbtide.body_crc32c", b"").decode(errors="replace")
            actual = f"{object_crc32c(body[: _footer_start(body)]):08x}"
            if stored != actual:
                raise _errors.CorruptObjectError(
                    key, f"checksum mismatch (footer says crc32c {stored!r}, content has {actual})"
                )
        table = reader.read_all()
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _errors.CorruptObjectError(key, f"not a readable Arrow IPC file ({exc})") from exc
    raw = table.schema.metadata or {}
    metadata = {k.decode(errors="replace"): v.decode(errors="replace") for k, v in raw.items()}
    found_format = metadata.get("ebbtide.format")
    if found_format != expected_format:
        raise _errors.CorruptObjectError(
            key, f"expected a {expected_format}, found {found_format!r}"
        )
    version = metadata.get("ebbtide.format_version")
    if version != str(FORMAT_VERSION):
        raise _errors.CorruptObjectError(
            key,
            f"format version {version!r} is not supported by this Ebbtide "
            f"(it reads version {FORMAT_VERSION}); upgrade Ebbtide to read it",
        )
    if not table.schema.remove_metadata().equals(schema):
        raise _errors.CorruptObjectError(key, f"unexpected schema {table.schema.remove_metadata()}")
    expected = metadata.get("ebbtide.crc32c")
    try:
        actual = content_digest(table)
    except (pa.ArrowException, ValueError, IndexError, TypeError) as exc:
        raise _errors.CorruptObjectError(key, f"unreadable columns ({exc})") from exc
    if expected != actual:
        raise _errors.CorruptObjectError(
            key, f"checksum mismatch (stored crc32c {expected}, computed {actual})"
        )
    return table, metadata


# --- journal segments --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class JournalRows:
    """The columns of a journal segment as numpy arrays plus one data buffer.

    Row ``i`` is (``lsn[i]``, ``op[i]``, ``disk[i]``, ``offset[i]``,
    ``length[i]``); a write's bytes are ``data[data_offsets[i]:data_offsets[i+1]]``.
    """

    lsn: np.ndarray[Any, np.dtype[np.uint64]]
    op: np.ndarray[Any, np.dtype[np.uint8]]
    disk: np.ndarray[Any, np.dtype[np.uint16]]
    offset: np.ndarray[Any, np.dtype[np.uint64]]
    length: np.ndarray[Any, np.dtype[np.uint64]]
    data_offsets: np.ndarray[Any, np.dtype[np.int64]]
    data: memoryview


@dataclasses.dataclass(frozen=True, slots=True)
class JournalSegment:
    vpg: str
    vm: str
    epoch: int
    first_lsn: int
    last_lsn: int
    previous_lsn: int  # last LSN of the VM's previous segment in this epoch (0: first)
    disks: tuple[str, ...]
    rows: JournalRows


def encode_journal_segment(
    *,
    vpg: str,
    vm: str,
    epoch: int,
    previous_lsn: int,
    disks: Iterable[str],
    lsn: np.ndarray[Any, np.dtype[np.uint64]],
    op: np.ndarray[Any, np.dtype[np.uint8]],
    disk: np.ndarray[Any, np.dtype[np.uint16]],
    offset: np.ndarray[Any, np.dtype[np.uint64]],
    length: np.ndarray[Any, np.dtype[np.uint64]],
    data_offsets: np.ndarray[Any, np.dtype[np.int64]],
    data: bytes | memoryview,
) -> bytes:
    """Encode one sealed journal buffer (rows in LSN order) as an Arrow IPC file."""
    count = len(lsn)
    data_array = pa.LargeBinaryArray.from_buffers(
        pa.large_binary(), count, [None, pa.py_buffer(data_offsets), pa.py_buffer(data)]
    )
    table = pa.Table.from_arrays(
        [
            pa.array(lsn),
            pa.array(op),
            pa.array(disk),
            pa.array(offset),
            pa.array(length),
            data_array,
        ],
        schema=JOURNAL_SCHEMA,
    )
    return _encode(
        table,
        {
            "ebbtide.format": "journal-segment",
            "ebbtide.vpg": vpg,
            "ebbtide.vm": vm,
            "ebbtide.epoch": str(epoch),
            "ebbtide.first_lsn": str(int(lsn[0])),
            "ebbtide.last_lsn": str(int(lsn[-1])),
            "ebbtide.previous_lsn": str(previous_lsn),
            "ebbtide.disks": json.dumps(list(disks)),
        },
        compress=_worth_compressing(data),
    )


def decode_journal_segment(key: str, body: bytes, *, crc: int) -> JournalSegment:
    """Decode and verify a journal segment (``crc``: from its key); errors name ``key``."""
    table, meta = _decode(key, body, "journal-segment", JOURNAL_SCHEMA, object_crc=crc)
    try:
        return _journal_segment(key, table, meta)
    except (pa.ArrowException, ValueError, IndexError, TypeError, KeyError) as exc:
        raise _errors.CorruptObjectError(key, f"unreadable segment ({exc})") from exc


def _journal_segment(key: str, table: pa.Table, meta: dict[str, str]) -> JournalSegment:
    table = table.combine_chunks()
    try:
        disks = tuple(json.loads(meta["ebbtide.disks"]))
        segment_meta = (meta["ebbtide.vpg"], meta["ebbtide.vm"], int(meta["ebbtide.epoch"]))
        first, last = int(meta["ebbtide.first_lsn"]), int(meta["ebbtide.last_lsn"])
        previous = int(meta["ebbtide.previous_lsn"])
    except (KeyError, ValueError, TypeError) as exc:
        raise _errors.CorruptObjectError(key, f"bad segment metadata ({exc})") from exc
    if table.num_rows == 0:
        raise _errors.CorruptObjectError(key, "segment has no rows")
    data_column = table.column("data").chunk(0)
    buffers = data_column.buffers()
    offsets = np.frombuffer(buffers[1], dtype=np.int64)[
        data_column.offset : data_column.offset + table.num_rows + 1
    ]
    rows = JournalRows(
        lsn=table.column("lsn").to_numpy(),
        op=table.column("op").to_numpy(),
        disk=table.column("disk").to_numpy(),
        offset=table.column("offset").to_numpy(),
        length=table.column("length").to_numpy(),
        data_offsets=offsets,
        data=memoryview(buffers[2]) if buffers[2] is not None else memoryview(b""),
    )
    if (
        int(rows.lsn[0]) != first
        or int(rows.lsn[-1]) != last
        or bool(np.any(np.diff(rows.lsn) <= 0))
    ):
        raise _errors.CorruptObjectError(
            key, "LSNs do not match the metadata or are not increasing"
        )
    if rows.disk.size and int(rows.disk.max()) >= max(len(disks), 1):
        raise _errors.CorruptObjectError(key, "a row names a disk the segment does not list")
    return JournalSegment(
        vpg=segment_meta[0],
        vm=segment_meta[1],
        epoch=segment_meta[2],
        first_lsn=first,
        last_lsn=last,
        previous_lsn=previous,
        disks=disks,
        rows=rows,
    )


# --- checkpoint index --------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class IndexRecord:
    """One row of the checkpoint index (FORMAT.md, "Checkpoint index")."""

    record: int  # RECORD_*
    seq: int  # the log entry that committed it
    lsn: int
    time_ns: int
    epoch: int
    kind: int = 0
    tag: str | None = None
    detail: str | None = None  # JSON, for config and takeover records
    positions: tuple[tuple[str, int], ...] | None = None

    def detail_json(self) -> dict[str, Any]:
        return dict(json.loads(self.detail)) if self.detail else {}


def encode_index(records: Iterable[IndexRecord], *, vpg: str, fmt: str, seq: int) -> bytes:
    """Encode index records as a log entry (``index-log``) or a snapshot (``index-snapshot``)."""
    rows = list(records)
    columns: dict[str, list[Any]] = {name: [] for name in INDEX_SCHEMA.names}
    for row in rows:
        columns["record"].append(row.record)
        columns["seq"].append(row.seq)
        columns["lsn"].append(row.lsn)
        columns["time_ns"].append(row.time_ns)
        columns["epoch"].append(row.epoch)
        columns["kind"].append(row.kind)
        columns["tag"].append(row.tag)
        columns["detail"].append(row.detail)
        columns["positions"].append(
            None
            if row.positions is None
            else [{"journal": journal, "lsn": lsn} for journal, lsn in row.positions]
        )
    table = pa.Table.from_pydict(columns, schema=INDEX_SCHEMA)
    return _encode(
        table,
        {"ebbtide.format": fmt, "ebbtide.vpg": vpg, "ebbtide.seq": str(seq)},
        footer_crc=True,
    )


def decode_index(key: str, body: bytes, *, vpg: str, fmt: str, seq: int) -> list[IndexRecord]:
    """Decode and verify a log entry or snapshot, checking it is the one ``key`` names."""
    table, meta = _decode(key, body, fmt, INDEX_SCHEMA)
    try:
        return _index_records(key, table, meta, vpg=vpg, seq=seq)
    except (pa.ArrowException, ValueError, IndexError, TypeError, KeyError) as exc:
        raise _errors.CorruptObjectError(key, f"unreadable index object ({exc})") from exc


def _index_records(
    key: str, table: pa.Table, meta: dict[str, str], *, vpg: str, seq: int
) -> list[IndexRecord]:
    if meta.get("ebbtide.vpg") != vpg:
        raise _errors.CorruptObjectError(
            key, f"belongs to VPG {meta.get('ebbtide.vpg')!r}, not {vpg!r}"
        )
    if meta.get("ebbtide.seq") != str(seq):
        raise _errors.CorruptObjectError(
            key, f"holds sequence {meta.get('ebbtide.seq')!r}, its name says {seq}"
        )
    # Column by column (numpy and one list per column), not to_pydict(): that
    # builds a dict per position, which dominated loading a 1M-record snapshot.
    plain = {
        name: table.column(name).combine_chunks().to_numpy().tolist()
        for name in ("record", "seq", "lsn", "time_ns", "epoch", "kind")
    }
    tags = table.column("tag").combine_chunks().to_pylist()
    details = table.column("detail").combine_chunks().to_pylist()
    lists = table.column("positions").combine_chunks()
    valid = lists.is_valid().to_numpy(zero_copy_only=False).tolist()
    offsets = lists.offsets.to_numpy().tolist()
    journal, journal_lsn = lists.values.flatten()  # offsets index the whole child array
    names = journal.dictionary_encode()
    journals = (
        np.array([*names.dictionary.to_pylist(), None], dtype=object)[
            names.indices.fill_null(len(names.dictionary)).to_numpy()
        ].tolist()
        if len(names)
        else []
    )
    pairs = list(zip(journals, journal_lsn.to_numpy(zero_copy_only=False).tolist(), strict=True))
    return [
        IndexRecord(  # positional: (record, seq, lsn, time_ns, epoch, kind, tag, detail, positions)
            record,
            seq_,
            lsn,
            time_ns,
            epoch,
            kind,
            tag,
            detail,
            ((pairs[start],) if end - start == 1 else tuple(pairs[start:end]))
            if is_valid
            else None,
        )
        for record, seq_, lsn, time_ns, epoch, kind, tag, detail, is_valid, start, end in zip(
            plain["record"],
            plain["seq"],
            plain["lsn"],
            plain["time_ns"],
            plain["epoch"],
            plain["kind"],
            tags,
            details,
            valid,
            offsets[:-1],
            offsets[1:],
            strict=True,
        )
    ]


# --- recovery-disk chunk maps ------------------------------------------------

MIRROR_MAP_SCHEMA = pa.schema(
    [
        pa.field("chunk", pa.uint64(), nullable=False),
        pa.field("sha256", pa.binary(32), nullable=False),
    ]
)


@dataclasses.dataclass(frozen=True, slots=True)
class MirrorMap:
    """A recovery disk as of ``lsn``: chunk index -> SHA-256 of its bytes (absent: zeros)."""

    vpg: str
    vm: str
    disk: str
    lsn: int
    disk_size: int
    chunk_size: int
    chunks: dict[int, bytes]


def encode_mirror_map(mirror: MirrorMap) -> bytes:
    """Encode a chunk map (rows by chunk index) as an Arrow IPC file with a footer CRC."""
    indexes = sorted(mirror.chunks)
    table = pa.Table.from_arrays(
        [
            pa.array(indexes, type=pa.uint64()),
            pa.array([mirror.chunks[i] for i in indexes], type=pa.binary(32)),
        ],
        schema=MIRROR_MAP_SCHEMA,
    )
    return _encode(
        table,
        {
            "ebbtide.format": "mirror-map",
            "ebbtide.vpg": mirror.vpg,
            "ebbtide.vm": mirror.vm,
            "ebbtide.disk": mirror.disk,
            "ebbtide.lsn": str(mirror.lsn),
            "ebbtide.disk_size": str(mirror.disk_size),
            "ebbtide.chunk_size": str(mirror.chunk_size),
        },
        footer_crc=True,
    )


def decode_mirror_map(
    key: str, body: bytes, *, vpg: str, vm: str, disk: str, lsn: int
) -> MirrorMap:
    """Decode and verify a chunk map, checking it is the one ``key`` names."""
    table, meta = _decode(key, body, "mirror-map", MIRROR_MAP_SCHEMA)
    try:
        found = (meta["ebbtide.vpg"], meta["ebbtide.vm"], meta["ebbtide.disk"])
        found_lsn = int(meta["ebbtide.lsn"])
        disk_size, chunk_size = int(meta["ebbtide.disk_size"]), int(meta["ebbtide.chunk_size"])
        indexes = table.column("chunk").to_pylist()
        digests = table.column("sha256").to_pylist()
    except (KeyError, ValueError, TypeError, pa.ArrowException) as exc:
        raise _errors.CorruptObjectError(key, f"bad chunk map ({exc})") from exc
    if found != (vpg, vm, disk) or found_lsn != lsn:
        raise _errors.CorruptObjectError(
            key, f"holds the map of {'/'.join(found)} at LSN {found_lsn}, not the one its name says"
        )
    if chunk_size <= 0:
        raise _errors.CorruptObjectError(key, f"bad chunk size {chunk_size}")
    return MirrorMap(
        vpg=vpg,
        vm=vm,
        disk=disk,
        lsn=lsn,
        disk_size=disk_size,
        chunk_size=chunk_size,
        chunks=dict(zip(indexes, digests, strict=True)),
    )
