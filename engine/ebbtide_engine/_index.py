"""The checkpoint index: an append-only log of Arrow entries plus snapshots.

The index is how a checkpoint becomes durable and listable. It is a linear
log, ``index/log/<seq>.arrow``, each entry written create-only with the
next sequence number, so appends are totally ordered and two writers can
never both append entry ``n`` (the loser is fenced). Entries hold records
(FORMAT.md, "Checkpoint index"):

- ``config``: the VMs and disk sizes from an LSN on (recovery needs no spec);
- ``takeover``: a writer started epoch ``e`` at LSN ``start``; writes of
  older epochs above ``valid_through`` (the last committed cut) are void;
- ``checkpoint``: a committed VPG-wide cut (its LSN is its id);
- ``shutdown``: the writer stopped cleanly after committing everything.

Every so often the writer compacts: it writes ``index/snapshot/<seq>.arrow``
with every record up to ``seq``, points the manifest at it (compare-and-swap,
so a fenced writer cannot), then deletes log entries below ``seq``. A reader
loads the manifest's snapshot and the log entries after it. Nothing is
ever overwritten.
"""

from __future__ import annotations

import bisect
import dataclasses
import datetime
import enum
import json
from collections.abc import Iterable, Sequence

from ebbtide_engine import _errors, _format, _keys, _lease
from ebbtide_engine.storage import _base


class CheckpointKind(enum.IntEnum):
    """Why a checkpoint was taken (stored as uint8 in the index)."""

    AUTOMATIC = 0
    TAGGED = 1
    APPLICATION_CONSISTENT = 2
    FAILOVER_TEST = 3


@dataclasses.dataclass(frozen=True, slots=True)
class Checkpoint:
    """A durable, VPG-wide cut: recovery to it yields every write with LSN < ``id``.

    The id is the checkpoint marker's own LSN, so ids are unique and ordered
    like the writes they follow.
    """

    id: int
    time_ns: int
    kind: CheckpointKind
    tag: str | None
    epoch: int

    @property
    def time(self) -> datetime.datetime:
        return datetime.datetime.fromtimestamp(self.time_ns / 1e9, tz=datetime.UTC)


@dataclasses.dataclass(frozen=True, slots=True)
class EpochRange:
    """LSNs whose writes from ``epoch`` count: ``start <= lsn <= end`` (end None: open)."""

    epoch: int
    start: int
    end: int | None
    #: per-VM journal positions at ``end`` (from the takeover that closed the epoch)
    end_positions: dict[str, int] | None = None


class IndexState:
    """The records of an index in sequence order, and views derived from them."""

    def __init__(self, vpg: str) -> None:
        self.vpg = vpg
        self.records: list[_format.IndexRecord] = []
        self.last_seq = 0
        self.checkpoints: list[Checkpoint] = []
        self._checkpoint_ids: list[int] = []
        self.positions: dict[int, dict[str, int]] = {}  # checkpoint id -> per-VM positions
        self.epochs: list[EpochRange] = []
        self.configs: list[tuple[int, dict[str, dict[str, int]]]] = []  # (from lsn, layout)
        self.clean_shutdown: bool | None = None  # None: nothing written yet
        self.max_lsn = 0

    def apply(self, records: Iterable[_format.IndexRecord]) -> None:
        for record in records:
            self.records.append(record)
            self.last_seq = max(self.last_seq, record.seq)
            self.max_lsn = max(self.max_lsn, record.lsn)
            if record.record == _format.RECORD_CHECKPOINT:
                checkpoint = Checkpoint(
                    id=record.lsn,
                    time_ns=record.time_ns,
                    kind=CheckpointKind(record.kind),
                    tag=record.tag,
                    epoch=record.epoch,
                )
                if self._checkpoint_ids and checkpoint.id <= self._checkpoint_ids[-1]:
                    raise _errors.CorruptObjectError(
                        f"index entry {record.seq}", f"checkpoint {checkpoint.id} is out of order"
                    )
                self.checkpoints.append(checkpoint)
                self._checkpoint_ids.append(checkpoint.id)
                self.positions[checkpoint.id] = dict(record.positions or ())
                self.clean_shutdown = False
            elif record.record == _format.RECORD_TAKEOVER:
                valid_through = int(record.detail_json()["valid_through"])
                closing = dict(record.positions or ())
                self.epochs = [
                    r
                    if r.end is not None
                    else dataclasses.replace(r, end=valid_through, end_positions=closing)
                    for r in self.epochs
                ]
                self.epochs.append(EpochRange(epoch=record.epoch, start=record.lsn, end=None))
                self.clean_shutdown = False
            elif record.record == _format.RECORD_CONFIG:
                self.configs.append((record.lsn, record.detail_json()["vms"]))
            elif record.record == _format.RECORD_SHUTDOWN:
                self.clean_shutdown = True

    @property
    def last_checkpoint(self) -> Checkpoint | None:
        return self.checkpoints[-1] if self.checkpoints else None

    def checkpoint(self, checkpoint_id: int) -> Checkpoint | None:
        index = bisect.bisect_left(self._checkpoint_ids, checkpoint_id)
        if index < len(self._checkpoint_ids) and self._checkpoint_ids[index] == checkpoint_id:
            return self.checkpoints[index]
        return None

    def latest_before(self, time_ns: int) -> Checkpoint | None:
        """The newest checkpoint taken at or before ``time_ns``."""
        best = None
        for checkpoint in reversed(self.checkpoints):
            if checkpoint.time_ns <= time_ns:
                best = checkpoint
                break
        return best

    def layout_at(self, lsn: int) -> dict[str, dict[str, int]]:
        """The VMs and disk sizes in force at ``lsn``."""
        layout: dict[str, dict[str, int]] = {}
        for start, vms in self.configs:
            if start > lsn:
                break
            layout = vms
        return layout

    def valid_ranges(self, cut: int) -> list[EpochRange]:
        """The epochs whose writes recovery to checkpoint ``cut`` uses, each cut to size.

        ``end_positions`` of each returned range are the per-VM journal
        positions at its end, which recovery checks the segment chain against.
        """
        ranges = []
        for r in self.epochs:
            if r.end is None or r.end >= cut:
                if r.start <= cut:
                    ranges.append(
                        dataclasses.replace(r, end=cut, end_positions=self.positions.get(cut, {}))
                    )
                break
            if r.start <= r.end:
                ranges.append(r)
        return ranges


async def put_new_idempotent(store: _base.ObjectStore, key: str, data: bytes) -> bool:
    """Create-only put that treats "exists with the same bytes" as success.

    Returns False if the key holds *other* bytes (another writer got there).
    A retried put whose first attempt did land but whose reply was lost
    must not look like a conflict.
    """
    try:
        await store.put_new(key, data)
    except _errors.ObjectExists:
        try:
            existing = await store.get(key)
        except _errors.ObjectNotFound:
            return False
        return existing.data == data
    return True


async def load(
    store: _base.ObjectStore, layout: _keys.VpgLayout, *, attempts: int = 5
) -> tuple[IndexState, _lease.Manifest | None]:
    """Read the index as a reader: manifest -> snapshot -> log entries after it.

    Retries when a concurrent compaction moved the snapshot under it.
    """
    for attempt in range(attempts):
        manifest = await _lease.read_manifest(store, layout)
        try:
            return await _load_once(store, layout, manifest), manifest
        except _MovedUnderUs:
            if attempt == attempts - 1:
                raise _errors.StorageUnavailable(
                    f"{store.description}: the index of VPG {layout.vpg!r} kept changing while "
                    "being read (compaction racing the reader); try again"
                ) from None
    raise AssertionError("unreachable")


class _MovedUnderUs(Exception):
    pass


async def _load_once(
    store: _base.ObjectStore, layout: _keys.VpgLayout, manifest: _lease.Manifest | None
) -> IndexState:
    state = IndexState(layout.vpg)
    start_after = None
    snapshot_seq = manifest.index_snapshot_seq if manifest else None
    if snapshot_seq is not None:
        key = layout.index_snapshot(snapshot_seq)
        try:
            stored = await store.get(key)
        except _errors.ObjectNotFound:
            raise _MovedUnderUs from None
        state.apply(
            _format.decode_index(
                key, stored.data, vpg=layout.vpg, fmt="index-snapshot", seq=snapshot_seq
            )
        )
        state.last_seq = snapshot_seq
        start_after = layout.index_log_entry(snapshot_seq)
    expected = state.last_seq + 1
    async for info in store.list(layout.index_log_prefix, start_after=start_after):
        seq = layout.parse_index_seq(info.key)
        if seq != expected:
            if snapshot_seq is not None or seq < expected:
                raise _MovedUnderUs
            raise _errors.CorruptObjectError(
                layout.index_log_entry(expected),
                f"index log entry {expected} is missing (found {seq} next); "
                "checkpoints after it cannot be trusted",
            )
        try:
            stored = await store.get(info.key)
        except _errors.ObjectNotFound:
            raise _MovedUnderUs from None
        state.apply(
            _format.decode_index(info.key, stored.data, vpg=layout.vpg, fmt="index-log", seq=seq)
        )
        expected += 1
    return state


class IndexWriter:
    """Appends to the log as the lease holder, and compacts it."""

    def __init__(
        self,
        store: _base.ObjectStore,
        layout: _keys.VpgLayout,
        lease: _lease.WriterLease,
        state: IndexState,
        *,
        compact_every: int = 256,
    ) -> None:
        self._store = store
        self._layout = layout
        self._lease = lease
        self.state = state
        self._compact_every = compact_every

    async def append(self, records: Sequence[_format.IndexRecord]) -> int:
        """Commit ``records`` as the next log entry; raises FencedError on a conflict."""
        if self._lease.lost is not None:
            raise self._lease.lost
        if not await self.try_append(records):
            error = _errors.FencedError(
                f"VPG {self._layout.vpg!r}: index entry {self.state.last_seq + 1} was written by "
                f"another writer; this writer (epoch {self._lease.epoch}) is fenced off and "
                "stops. The other writer now protects the VPG."
            )
            self._lease.fence(error)
            raise error
        snapshot = self._lease.manifest.index_snapshot_seq or 0
        if self.state.last_seq - snapshot >= self._compact_every:
            await self.compact()
        return self.state.last_seq

    async def try_append(self, records: Sequence[_format.IndexRecord]) -> bool:
        """Append ``records`` as entry ``last_seq + 1``; False if that entry is taken."""
        seq = self.state.last_seq + 1
        stamped = [dataclasses.replace(record, seq=seq) for record in records]
        body = _format.encode_index(stamped, vpg=self._layout.vpg, fmt="index-log", seq=seq)
        if not await put_new_idempotent(self._store, self._layout.index_log_entry(seq), body):
            return False
        self.state.apply(stamped)
        return True

    async def compact(self) -> None:
        """Snapshot every record so far, point the manifest at it, drop older log entries."""
        seq = self.state.last_seq
        previous = self._lease.manifest.index_snapshot_seq
        if seq == 0 or previous == seq:
            return
        body = _format.encode_index(
            self.state.records, vpg=self._layout.vpg, fmt="index-snapshot", seq=seq
        )
        await put_new_idempotent(self._store, self._layout.index_snapshot(seq), body)
        await self._lease.update(lambda m: dataclasses.replace(m, index_snapshot_seq=seq))
        # Keep entry `seq` itself: a fenced writer re-creating deleted entries
        # runs into it, and readers start after it anyway.
        async for info in self._store.list(self._layout.index_log_prefix):
            if self._layout.parse_index_seq(info.key) >= seq:
                break
            await self._store.delete(info.key)
        # Keep the previous snapshot for readers that loaded the old manifest.
        async for info in self._store.list(self._layout.index_snapshot_prefix):
            old = self._layout.parse_index_seq(info.key)
            if previous is None or old >= previous:
                break
            await self._store.delete(info.key)


def config_record(
    lsn: int, time_ns: int, epoch: int, vms: dict[str, dict[str, int]]
) -> _format.IndexRecord:
    return _format.IndexRecord(
        record=_format.RECORD_CONFIG,
        seq=0,
        lsn=lsn,
        time_ns=time_ns,
        epoch=epoch,
        detail=json.dumps({"vms": vms}, sort_keys=True),
    )
